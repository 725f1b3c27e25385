"""Benchmarks: run `python -m bench` (all) or `python -m bench.NAME`; they print figures."""
