"""Reliability and safety (issue 9): faults injected for real, bad input refused by name, no leaks.

A package so its modules import their own helpers (`from .helpers import ...`) apart from the
suite's (`from helpers import ...`, tests/helpers.py).
"""
