"""lightning_idlg: gradient-leakage attacks (DLG, iDLG) as Lightning experiments.

Data flows one way: data -> client (shared gradient) -> attack -> metrics -> results -> report.
"""

__version__ = "0.1.0"
