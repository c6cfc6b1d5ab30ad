"""Sweep definitions for `python -m experiments.sweep` (nfnets.research)."""
