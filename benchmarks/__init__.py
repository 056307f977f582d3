"""Benchmarks that print tables (`python -m benchmarks.training`, `python benchmarks/memory.py`);
not installed with the package."""
