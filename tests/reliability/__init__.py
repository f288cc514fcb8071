"""Reliability and safety (issue 9): faults injected for real, bad input refused by name, no leaks.

A package so its modules import their shared helpers (`from .helpers import ...`) beside the
suite's top-level conftest.
"""
