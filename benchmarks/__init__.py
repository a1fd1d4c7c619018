"""Benchmark scripts for uniperception (run them as scripts; nothing here is imported by the package)."""
