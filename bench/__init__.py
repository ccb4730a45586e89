"""Benchmarks: scripts that print figures (never timed assertions). Run as `python -m bench.NAME`."""
