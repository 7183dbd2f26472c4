"""The policy and the critic on Megatron, and the pieces of a training run.

- ``run``: everything a run holds (data, models, weight stream, engines, scorer, sinks), built once
- ``model``: a trainable Megatron model (DDP, optimizer, schedule) and Megatron's schedule runner
- ``policy``: log-probs and entropy of a batch, the PPO-style update
- ``critic``: values and the value-loss update (GAE)
- ``reference``: the initial policy for KL terms, swapped in from host memory
- ``batch``: a step's samples as tensors in label space, micro-batches, gathering results
- ``experience``: reward shaping, advantages, train/rollout correction weights
- ``loop``: the RL loop (fit, train_step, rollout rounds, validation)
- ``optim``: Megatron's Adam and learning-rate schedule from the config
"""
