"""RL algorithms as registries of pure tensor functions (advantages, losses, aggregation, ...)."""
