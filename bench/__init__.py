"""modelgate benchmarks: `python -m bench --help`."""
