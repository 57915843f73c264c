"""The one error type for bad settings, and the checks most settings share: its message is one line that
says what is valid. The app prints it as `error: ...` and exits with status 2 instead of a traceback."""

from __future__ import annotations

import math
from typing import Iterable


class ConfigError(ValueError):
    """A bad setting (override, config value or argument)."""


def is_positive_int(value) -> bool:
    """An int >= 1 (a bool is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_positive_number(value) -> bool:
    """A finite int or float > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def positive_int(key: str, value, what: str | None = None) -> int:
    """`value` if it is a positive integer, else ConfigError "KEY must be a positive integer (WHAT), got V"."""
    if not is_positive_int(value):
        raise ConfigError(f"{key} must be a positive integer{f' ({what})' if what else ''}, got {value!r}")
    return value


def instantiate_part(node, causes: tuple[type[BaseException], ...] = (ConfigError,)):
    """`hydra.utils.instantiate(node)`, raising the part's own error (one of `causes`: its one line) instead of
    Hydra's InstantiationException around it; any other failure stays Hydra's."""
    from hydra.errors import InstantiationException  # imported here: this module is imported before torch
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, causes):
            raise err.__cause__ from None
        raise


def one_of(key: str, value, valid: Iterable) -> object:
    """`value` if it is one of `valid`, else ConfigError "KEY=V is not known; valid: A, B"."""
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not known; valid: {', '.join(map(str, valid))}")
    return value
