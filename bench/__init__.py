"""Benchmarks and the pretraining command of the embedded foundation stack."""
