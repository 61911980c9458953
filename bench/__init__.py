"""Benchmarks and GPU checks (not installed). Each module runs as a script (python bench/<module>.py) and imports
as bench.<module> from the repository root (the tests: python -m pytest tests)."""
