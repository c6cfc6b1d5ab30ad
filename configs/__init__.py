"""Configs package."""
