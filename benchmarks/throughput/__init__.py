"""Throughput benchmarks: `train` (a fusion head over frozen 4-bit backbones) and `alignment` (the causal
cross-tokenizer alignment)."""
