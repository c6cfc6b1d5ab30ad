"""Shared helpers for the tests; not tests themselves (pytest collects none).

`train_harness.py` is a script that runs a tiny training job in a fresh
process (the multi-device and multi-process tests start it in subprocesses,
each with its own device count), and its `tiny_config` is the tiny NFNet
config the single-process loop tests train.
"""
