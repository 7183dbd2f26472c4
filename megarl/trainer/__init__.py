"""The policy and the critic on Megatron, and the pieces of a training run.

- ``run``: everything a run holds (data, models, weight stream, engines, scorer, sinks), built once
- ``model``: a trainable Megatron model (DDP, optimizer, schedule), its one forward step, the
  update over an objective and the forward passes
- ``objective``: the objective protocol (fields, named metrics, ``loss``), a micro-batch's loss sum
- ``policy``: log-probs and entropy of a batch, the PPO-style objective, the hidden-states head
- ``critic``: values and the value-loss objective (GAE), the value head
- ``reference``: the initial policy for KL terms, swapped in from host memory
- ``batch``: a step's samples as tensors in label space, micro-batches, gathering results
- ``experience``: reward shaping, advantages, train/rollout correction weights
- ``loop``: the RL loop (fit, train_step, rollout rounds, validation)
- ``optim``: Megatron's Adam and learning-rate schedule from the config
"""
