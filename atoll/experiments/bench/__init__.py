"""Benchmarks: JSON lines; each measures its baseline in the same run."""
