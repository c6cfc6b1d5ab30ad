"""Experiments package."""
