"""The one error type for bad settings: its message is one line that says what is valid. The app prints
it as `error: ...` and exits with status 2 instead of a traceback."""


class ConfigError(ValueError):
    """A bad setting (override, config value or argument)."""
