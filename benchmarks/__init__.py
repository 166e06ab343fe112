"""Measured speed of the LPT method and of the sweep orchestration: `python benchmarks/run.py [--quick]`."""
