"""Private: a restricted unpickler for the CIFAR python batches.

The official CIFAR files are Python-2 pickles of dicts holding numpy arrays, lists and
bytes. Plain :func:`pickle.load` would run arbitrary code from a tampered file; this
unpickler only resolves the few globals needed to rebuild numpy arrays.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

_NUMPY_MODULES = frozenset(
    {
        "numpy",
        "numpy.core.multiarray",
        "numpy._core.multiarray",
        "numpy.core.numeric",
        "numpy._core.numeric",
    }
)
_NUMPY_NAMES = frozenset({"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"})
#: Python 3 writes bytes at pickle protocol 2 as ``_codecs.encode(str, "latin1")``.
_OTHER_GLOBALS = frozenset({("_codecs", "encode")})


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except array and bytes reconstruction helpers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is an allowed numpy helper."""
        if (module in _NUMPY_MODULES and name in _NUMPY_NAMES) or (
            (module, name) in _OTHER_GLOBALS
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickle_dict(path: Path) -> dict[str, Any]:
    """Load a pickled dict with bytes or str keys; keys are returned as ``str``.

    Raises:
        ValueError: If the file is not a (safe) pickle of a dict; the message names the file.
    """
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
