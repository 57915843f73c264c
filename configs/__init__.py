"""Hydra configs of lightning_idlg (installed as a package so the app finds them anywhere)."""
