"""lightning_idlg: gradient-leakage attacks (DLG, iDLG) as Lightning experiments.

Data flows one way, and so do the imports, folder by folder: case/ (data, victim, client: the shared
gradient) -> attacks/ (what the attacker runs on it) -> records/ (metrics, evaluation, what a trial leaves)
-> run/ (one experiment end to end) -> report/ (tables and figures of finished runs); the front doors
(app, api, train, label_restoration) stand on top.
"""

import os

# OpenMP threads that spin while waiting turn a busy 2-core machine into 100x slower evaluations
# (measured: 390 ms instead of 3.5 ms); passive waiting costs nothing measurable on a quiet one.
# Set before torch is imported by any of our modules; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["Reconstruction", "attack", "show", "__version__"]


def __getattr__(name: str):
    """`from lightning_idlg import attack, show` (the Python API, lightning_idlg.api), imported on first use:
    the app takes its run dir's lock before torch is imported, so a refused run stops in about a second."""
    if name in ("Reconstruction", "attack", "show"):
        from lightning_idlg import api

        return getattr(api, name)
    raise AttributeError(f"module 'lightning_idlg' has no attribute {name!r}")
