"""Sweep definitions for `python -m experiments.sweep` (see nfnets/sweep.py)."""
