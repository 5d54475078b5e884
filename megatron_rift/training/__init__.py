"""The trainer behind ``python -m megatron_rift.train``; see docs/training.md for the tour."""
