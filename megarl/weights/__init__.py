"""The weight stream: Megatron shards -> HF-named tensors in flat buckets -> the rollout engines."""
