"""megarl: a Megatron-native reinforcement-learning trainer for large language models."""

__version__ = "0.1.0"
