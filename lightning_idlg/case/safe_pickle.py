"""Read a pickle from a user path without letting it run code.

`pickle.load` calls whatever callables the file names (`os.system`, `subprocess.Popen`, ...), so a crafted
file under `dataset.root` runs its payload before anything can check it. `load` allows only what the
CIFAR pickles need: the builtin containers and scalars (no lookup needed) and numpy's array reconstruction;
any other name stops the load with a one-line `UnsafePickleError` before it is imported or called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

# the names a pickled numpy array (protocol 2, from Python 2 or 3) refers to, and the builtin that protocol 2
# uses for a bytes object: nothing else is importable from the file
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5 (no object dtype: numpy refuses it)
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("_codecs").encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a callable outside `ALLOWED`."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"it asks to load {module}.{name}, which a data file never needs (only numpy "
                                    "arrays and builtin containers are allowed); it was not loaded") from None


def load(path: str | Path, encoding: str = "latin1"):
    """The object pickled in `path`, read with `RestrictedUnpickler` (CIFAR's pickles: encoding latin1)."""
    data = Path(path).read_bytes()
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
