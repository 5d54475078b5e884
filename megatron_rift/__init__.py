"""megatron-rift: Reward-Informed Fine-Tuning (RIFT) on Megatron-Core."""

__version__ = "0.1.0"
