"""The policy on Megatron: log-probs and entropy of a batch, and the PPO-style update.

Both passes go through Megatron's pipeline schedule on every rank of the layout. On the last
pipeline stage, with ``train.fused_linear_logprob`` (the default), a :class:`HiddenStatesHead` in
the output layer's place hands back the last hidden states and
:mod:`megarl.kernels.fused_linear_logprob_entropy` computes log-probs and entropy from them and the
output weight's vocab shard tile by tile, never holding the ``[tokens, V/TP]`` logits; without it
the vocab-parallel logits ``[b, s, V/TP]`` go into :mod:`megarl.kernels.logprob_entropy`. Both
reduce over the tensor-parallel group without gathering the vocabulary (Triton on CUDA, the torch
path on CPU). The logits are divided by the sampling temperature there, so the trainer's log-probs
are those of the distribution the engine sampled from. When the advantage estimator reads it
(``optimal_token_baseline``), the old-log-prob pass also computes each token's sum of squared
probabilities over the vocabulary from the same output (:mod:`megarl.trainer.sum_pi_squared`).

The update: ``train.ppo_epochs`` passes over the batch; each pass shuffles it (seeded by the step)
and cuts it into mini-batches of ``train.mini_batch_size`` samples, one optimizer step each; a
mini-batch is split over the data-parallel ranks and into micro-batches
(:func:`megarl.data.batching.plan_micro_batches`). The loss of a micro-batch is the policy loss
(:mod:`megarl.algorithms.policy_losses`; a loss that draws at random, ``clip_cov``, gets a seed
per micro-batch) times the train/rollout correction weights (TIS, ICEPOP
or decoupled PPO's behaviour weight, :mod:`megarl.algorithms.mismatch`), plus the
entropy bonus and the KL loss, aggregated per ``algorithm.loss_agg_mode``; Megatron normalises by
the whole mini-batch's count (:mod:`megarl.trainer.model`). The policy is the update's
:class:`~megarl.trainer.objective.Objective`.
"""

from __future__ import annotations

import contextlib

import torch

from megarl.algorithms.advantages import ADVANTAGES
from megarl.algorithms.kl import kl_loss
from megarl.algorithms.policy_losses import entropy_bonus, policy_loss
from megarl.config import AlgorithmConfig, TrainConfig
from megarl.trainer.batch import TrainBatch
from megarl.trainer.model import TrainModel
from megarl.trainer.objective import ModelObjective, aggregate_micro_batch
from megarl.trainer.packing import to_grid


class HiddenStatesHead(torch.nn.Module):
    """Takes the place of ``GPTModel.output_layer`` with ``train.fused_linear_logprob``: hands back
    its input, the last hidden states ``[s, b, H]``, instead of the logits (the fused kernel applies
    the output weight itself).

    It keeps the output layer's weight, the same Parameter under the same name (None where the
    chunk ties it to its own word embedding), and the output layer's checkpoint layout: the
    optimizer, the weight stream and checkpoints see the model unchanged. Under sequence
    parallelism the hidden states arrive split along the sequence over ``tp_group`` and are
    gathered; the gather's backward reduce-scatters their gradient (each rank's part from its
    vocabulary shard, summed over the ranks, each keeping its own sequence slice), so the fused
    kernel is called with ``sum_hidden_grad=False`` (:func:`token_log_probs_and_entropy`): half
    the bytes of an all-reduce followed by a split.

    Args:
        output_layer: the ``ColumnParallelLinear`` it replaces.
    """

    def __init__(self, output_layer):
        super().__init__()
        self.register_parameter("weight", output_layer.weight)
        self.sequence_parallel = output_layer.sequence_parallel
        self.tp_group = output_layer.tp_group

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True, group=self.tp_group)
        return hidden_states, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The weight sharded over the tensor-parallel ranks along the vocabulary, as the
        ``ColumnParallelLinear`` it replaces saves it."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


def attach_hidden_states_heads(chunks: list, spec) -> None:
    """Replace the output layer of the last pipeline stage's chunk with a :class:`HiddenStatesHead`."""
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer = HiddenStatesHead(chunk.output_layer)


class Policy(ModelObjective):
    """The policy model under training, and the update's objective.

    Args:
        model: the Megatron model with its optimizer (built with :func:`attach_hidden_states_heads`
            when ``train.fused_linear_logprob``).
        algorithm: the policy loss, its entropy and KL terms and the loss aggregation.
        train: the shuffling seed and whether log-probs come from the fused kernel.
        temperature: ``rollout.temperature``, which divides the logits.
        max_response_length: ``data.max_response_length``, L of ``seq-mean-token-sum-norm``.
    """

    def __init__(self, model: TrainModel, algorithm: AlgorithmConfig, train: TrainConfig, *, temperature: float, max_response_length: int):
        self.model = model
        self.algorithm = algorithm
        self.seed = train.seed
        self.fused_linear_logprob = train.fused_linear_logprob
        self.temperature = temperature
        self.max_response_length = max_response_length
        self.pg_collection = model.pg_collection
        self.fields = ("old_log_probs", "advantages", "loss_weights") + (("ref_log_probs",) if algorithm.use_kl_loss else ())
        self.metrics = metric_names(algorithm)
        """Token sums of the per-token metrics: the policy loss's own, the entropy and the KL loss."""
        self._draw_step, self._draws = 0, 0
        """The step being trained and the micro-batches whose loss this rank has computed in it
        (:meth:`_next_draw_seed`)."""
        self.computes_sum_pi_squared = ADVANTAGES.takes(algorithm.advantage_estimator, "sum_pi_squared")
        """Whether the old-log-prob pass also gives ``sum_pi_squared`` (the estimator reads it)."""

    # Forward passes.

    def old_log_probs(self, batch: TrainBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The log-probs the update's ratios start from (with ``sum_pi_squared`` when the advantage
        estimator reads it), and the router metrics of the pass (``moe/*``,
        :mod:`megarl.trainer.routing`; none for a dense model).

        With ``algorithm.routing_replay`` ``r3`` the pass replays the engines' routing
        (``batch.routed_experts``); with ``r2`` it records its own into ``batch.routed_experts``
        for the update to replay.

        Returns:
            ``(token_values, metrics)``, the same on every rank: ``token_values`` holds
            ``old_log_probs`` and, with :attr:`computes_sum_pi_squared`, ``sum_pi_squared``, each
            ``[B, S]`` float32 in label space, 0 outside the response mask.
        """
        routers = self.model.routers
        if routers is None:
            return self._old_token_values(batch), {}
        with contextlib.ExitStack() as passes:
            metrics = passes.enter_context(routers.measuring())
            if self.algorithm.routing_replay == "r3":
                passes.enter_context(routers.replaying_routing())
            elif self.algorithm.routing_replay == "r2":
                recorded = passes.enter_context(routers.recording(tuple(batch.tokens.shape)))
            values = self._old_token_values(batch)
        if self.algorithm.routing_replay == "r2":
            batch.routed_experts, batch.routed_lengths = recorded["routed_experts"], batch.sequence_lengths.clone()
        return values, metrics

    def _old_token_values(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        if not self.computes_sum_pi_squared:
            return {"old_log_probs": self.log_probs(batch)[0]}
        values = self.model.forward(batch, ("log_probs", "sum_pi_squared"), self._token_log_probs_and_sum_pi_squared)
        return {"old_log_probs": values["log_probs"], "sum_pi_squared": values["sum_pi_squared"]}

    def reference_log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs of the weights the caller swapped in (the reference), routed as the engines
        routed with ``r3``, else by the reference's own routers."""
        with self._replaying(self.algorithm.routing_replay == "r3"):
            return self.log_probs(batch)[0]

    def _replaying(self, replay: bool):
        if replay and self.model.routers is not None:
            return self.model.routers.replaying_routing()
        return contextlib.nullcontext()

    def log_probs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens and the entropy at every position, no gradient.

        Returns:
            ``(log_probs, entropy)``, both ``[B, S]`` float32 in label space, on every rank
            (0 outside the response mask).
        """
        values = self.model.forward(batch, ("log_probs", "entropy"), self._token_log_probs)
        return values["log_probs"], values["entropy"]

    def _token_log_probs(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, torch.Tensor]:
        log_probs, entropy = self._log_probs_and_entropy(output, micro)
        return {"log_probs": log_probs, "entropy": entropy}

    def _token_log_probs_and_sum_pi_squared(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, torch.Tensor]:
        options = dict(temperature=self.temperature, fused_linear_logprob=self.fused_linear_logprob)
        log_probs, _ = token_log_probs_and_entropy(self.model, output, micro, **options)
        return {"log_probs": log_probs, "sum_pi_squared": token_sum_pi_squared(self.model, output, micro, **options)}

    def _log_probs_and_entropy(self, output: torch.Tensor, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs, entropy)`` in the micro-batch's grid ``[b, s]`` from the last stage's output
        for its tokens (packed or padded): the hidden states ``[b', s', H]`` with the fused kernel,
        else the vocab-parallel logits ``[b', s', V/TP]``."""
        return token_log_probs_and_entropy(self.model, output, micro, temperature=self.temperature, fused_linear_logprob=self.fused_linear_logprob)

    # The update.

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Train on ``batch`` (with ``old_log_probs``, ``advantages``, ``loss_weights`` and, with a KL
        loss, ``ref_log_probs`` among its token values).

        Args:
            batch: the step's samples.
            step: the RL step, which seeds the mini-batch shuffling.

        Returns:
            Metrics averaged over the mini-batches: ``policy/loss``, ``policy/clip_fraction_low`` ...,
            ``policy/grad_norm``, ``policy/lr``, ``policy/skipped_steps``; on an MoE model the
            router losses Megatron computed (``moe/load_balancing_loss``, ``moe/z_loss`` ... when
            enabled). With routing replay the update replays ``batch.routed_experts``.
        """
        routers = self.model.routers
        router_losses = routers.tracking_losses() if routers is not None else contextlib.nullcontext({})
        self._draw_step, self._draws = step, 0
        with self._replaying(self.algorithm.routing_replay != "none"), router_losses as losses:
            metrics = self.model.update(batch, self, seed=self.seed * 1_000_003 + step)
        return {**{f"policy/{name}": value for name, value in metrics.items()}, **losses}

    def _next_draw_seed(self) -> int:
        """The seed of the random draws of the next micro-batch's loss (``clip_cov``'s subset): one
        per (``train.seed``, step, data-parallel rank, micro-batch of this rank's update). The ranks
        that share a micro-batch count the same micro-batches, so tensor-parallel ranks draw alike
        (context-parallel ranks draw with the same seed over their own tokens); a step trained
        again after a resume draws the same."""
        parts = (self.seed, self._draw_step, self.pg_collection.dp.rank(), self._draws)
        self._draws += 1
        seed = 0
        for part in parts:
            seed = (seed * 1_000_003 + part) % 2**63
        return seed

    @property
    def routing_layout(self) -> tuple[list[int], int]:
        """``(moe_layers, num_experts)``: what a batch's routed experts are packed by
        (:meth:`TrainBatch.from_scored`'s ``routing``)."""
        return self.model.routers.moe_layers, self.model.routers.num_experts

    def loss(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's ``(loss_sum, count, {metric: token sum})`` (:class:`~megarl.trainer.objective.Objective`)."""
        algorithm = self.algorithm
        mask = micro["response_mask"]
        log_probs, entropy = self._log_probs_and_entropy(output, micro)
        per_token, loss_metrics = policy_loss(
            algorithm.policy_loss,
            log_probs=log_probs,
            old_log_probs=micro["old_log_probs"],
            advantages=micro["advantages"],
            response_mask=mask,
            seed=self._next_draw_seed(),
            **loss_settings(algorithm),
        )
        per_token = per_token * micro["loss_weights"]
        if algorithm.entropy_coeff:
            per_token = per_token + entropy_bonus(entropy, mask, algorithm.entropy_coeff)
        kl = torch.zeros_like(per_token)
        if algorithm.use_kl_loss:
            kl = kl_loss(log_probs, micro["ref_log_probs"], mask, estimator=algorithm.kl_loss_estimator, coefficient=algorithm.kl_loss_coef)
            per_token = per_token + kl
        loss_sum, count = aggregate_micro_batch(per_token, micro, algorithm.loss_agg_mode, self.max_response_length, self.pg_collection.cp.rank())
        # The policy loss's metrics are means over the valid tokens: weighted back into sums.
        tokens = mask.sum().to(torch.float64)
        valid = mask.bool()
        sums = {name: value.detach().double() * tokens for name, value in loss_metrics.items()}
        sums["entropy"] = torch.where(valid, entropy.detach(), 0.0).sum().double()
        sums["kl_loss"] = torch.where(valid, kl.detach(), 0.0).sum().double()
        return loss_sum, count, sums


def token_log_probs_and_entropy(
    model: TrainModel, output: torch.Tensor, micro: dict[str, torch.Tensor], *, temperature: float, fused_linear_logprob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of ``micro["labels"]`` in the micro-batch's grid ``[b, s]``, from the
    last stage's output of ``model`` for its tokens (packed or padded): the hidden states
    ``[b', s', H]`` with ``fused_linear_logprob`` (the model built with
    :func:`attach_hidden_states_heads`), else the vocab-parallel logits ``[b', s', V/TP]``; the
    logits divided by ``temperature``."""
    options = dict(temperature=temperature, vocab_size=model.spec.hf_config.vocab_size, group=model.pg_collection.tp)
    if not fused_linear_logprob:
        from megarl.kernels.logprob_entropy import logprob_entropy

        log_probs, entropy = logprob_entropy(output, micro["labels"], **options)
    else:
        from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy

        # Under sequence parallelism the head's gather reduce-scatters the hidden gradient (HiddenStatesHead).
        sequence_parallel = model.spec.transformer_config.sequence_parallel
        log_probs, entropy = fused_linear_logprob_entropy(
            output, model.output_weight, micro["labels"], sum_hidden_grad=not sequence_parallel, **options
        )
    return to_grid(micro, log_probs), to_grid(micro, entropy)


def token_sum_pi_squared(
    model: TrainModel, output: torch.Tensor, micro: dict[str, torch.Tensor], *, temperature: float, fused_linear_logprob: bool
) -> torch.Tensor:
    """``sum_v pi(v)^2`` at every token in the micro-batch's grid ``[b, s]``, from the same last-stage
    output as :func:`token_log_probs_and_entropy` (hidden states ``[b', s', H]`` with the output
    weight's shard, or vocab-parallel logits ``[b', s', V/TP]``), the logits divided by
    ``temperature`` and the padded vocabulary left out (:mod:`megarl.trainer.sum_pi_squared`)."""
    from megarl.trainer.sum_pi_squared import sum_pi_squared, sum_pi_squared_from_hidden

    options = dict(temperature=temperature, vocab_size=model.spec.hf_config.vocab_size, group=model.pg_collection.tp)
    if fused_linear_logprob:
        values = sum_pi_squared_from_hidden(output, model.output_weight, **options)
    else:
        values = sum_pi_squared(output, **options)
    return to_grid(micro, values)


def metric_names(algorithm: AlgorithmConfig) -> tuple[str, ...]:
    """The metrics :meth:`Policy.loss` reports: those of ``algorithm.policy_loss`` (a loss reports
    the same names, means over the valid tokens, on every input, so one call on one token tells
    them; a loss registered by a user reports its own), then ``entropy`` and ``kl_loss``."""
    token = torch.zeros(1, 1)
    _, loss_metrics = policy_loss(
        algorithm.policy_loss,
        log_probs=token,
        old_log_probs=token,
        advantages=token,
        response_mask=torch.ones(1, 1, dtype=torch.bool),
        seed=0,
        **loss_settings(algorithm),
    )
    return (*loss_metrics, "entropy", "kl_loss")


LOSS_SETTINGS = (
    "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "tau_pos", "tau_neg",
    "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef",
)  # fmt: skip
"""The ``algorithm`` fields the policy losses declare as keyword settings."""


def loss_settings(algorithm: AlgorithmConfig) -> dict[str, float | None]:
    """``{field: value}`` of :data:`LOSS_SETTINGS`: every policy loss takes those it declares
    (:meth:`megarl.algorithms.registry.Registry.call`)."""
    return {name: getattr(algorithm, name) for name in LOSS_SETTINGS}
