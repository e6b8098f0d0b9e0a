"""Benchmarks and load tools (never imported by app/, billing/ or inference/)."""
