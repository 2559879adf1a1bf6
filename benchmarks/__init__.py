"""Benchmarks (not tests): `python -m benchmarks` runs the suite; see benchmarks/__main__.py."""
