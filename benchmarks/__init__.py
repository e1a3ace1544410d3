"""Benchmark scripts: each measures one promise of the service and prints a table (they are not tests)."""
