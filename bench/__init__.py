"""syncd benchmarks: `make bench` (python -m bench) prints every figure and writes JSON."""
