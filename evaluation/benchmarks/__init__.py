"""Benchmarks: the training step, sampling and the data path."""
