"""Benchmark scripts: `python -m benchmarks.<name>`; each compares against the PyTorch reference."""
