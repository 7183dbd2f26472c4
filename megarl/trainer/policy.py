"""The policy on Megatron: log-probs and entropy of a batch, and the PPO-style update.

Both passes go through Megatron's pipeline schedule on every rank of the layout. On the last
pipeline stage, with ``train.fused_linear_logprob`` (the default), the output layer hands back the
last hidden states and :mod:`megarl.kernels.fused_linear_logprob_entropy` computes log-probs and
entropy from them and the output weight's vocab shard tile by tile, never holding the
``[tokens, V/TP]`` logits; without it the vocab-parallel logits ``[b, s, V/TP]`` go into
:mod:`megarl.kernels.logprob_entropy`. Both reduce over the tensor-parallel group without gathering
the vocabulary (Triton on CUDA, the torch path on CPU). The logits are divided by
the sampling temperature there, so the trainer's log-probs are those of the distribution the
engine sampled from.

The update: ``train.ppo_epochs`` passes over the batch; each pass shuffles it (seeded by the step)
and cuts it into mini-batches of ``train.mini_batch_size`` samples, one optimizer step each; a
mini-batch is split over the data-parallel ranks and into micro-batches
(:func:`megarl.data.batching.plan_micro_batches`). The loss of a micro-batch is the policy loss
(:mod:`megarl.algorithms.policy_losses`) times the train/rollout correction weights, plus the
entropy bonus and the KL loss, aggregated per ``algorithm.loss_agg_mode``; Megatron normalises by
the whole mini-batch's count (:mod:`megarl.trainer.model`).
"""

from __future__ import annotations

import functools
import types
import torch

from megarl.algorithms.kl import kl_loss
from megarl.algorithms.policy_losses import entropy_bonus, policy_loss
from megarl.config import Config
from megarl.platform import current_device
from megarl.trainer.batch import TrainBatch, gather_token_values
from megarl.trainer.model import TrainModel, aggregate_micro_batch

UPDATE_METRICS = (
    "loss_sum", "count", "tokens", "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction",
    "approx_kl", "ratio_mean", "entropy", "kl_loss",
)
"""The sums each micro-batch reports, in this order: the aggregated loss and its normaliser, the
valid tokens, then token-weighted sums of the per-token metrics."""


class Policy:
    """The policy model under training.

    Args:
        model: the Megatron model with its optimizer.
        config: the run's config.
    """

    def __init__(self, model: TrainModel, config: Config):
        if config.train.fused_linear_logprob:
            for chunk in model.chunks:
                if chunk.post_process:
                    chunk.output_layer.forward = types.MethodType(_hidden_states_out, chunk.output_layer)
        self.model = model
        self.config = config
        self.vocab_size = model.spec.hf_config.vocab_size
        self.temperature = config.rollout.temperature
        self.pg_collection = model.pg_collection

    # Forward passes.

    def log_probs(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the sampled tokens and the entropy at every position, no gradient.

        Returns:
            ``(log_probs, entropy)``, both ``[B, S]`` float32 in label space, on every rank
            (0 outside the response mask).
        """
        micro_batches = self.model.micro_batches(batch, torch.arange(batch.size), fields=())
        outputs = self.model.run(micro_batches, self._forward_step_log_probs, forward_only=True)
        log_probs, entropy = batch.empty_token_values(), batch.empty_token_values()
        for output in outputs:
            rows, columns = output["rows"][:, None], output["columns"][None, :]
            log_probs[rows, columns] = output["log_probs"]
            entropy[rows, columns] = output["entropy"]
        stacked = gather_token_values(torch.stack([log_probs, entropy]).to(current_device()), self.pg_collection, is_last_stage=self.model.is_last_stage)
        mask = batch.response_mask
        return torch.where(mask, stacked[0].cpu(), 0.0), torch.where(mask, stacked[1].cpu(), 0.0)

    def _log_probs_and_entropy(self, model, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs, entropy) [b, s]`` from the last stage's output: the hidden states ``[b, s, H]``
        with the fused kernel, else the vocab-parallel logits ``[b, s, V/TP]``."""
        options = dict(temperature=self.temperature, vocab_size=self.vocab_size, group=self.pg_collection.tp)
        if not self.config.train.fused_linear_logprob:
            from megarl.kernels.logprob_entropy import logprob_entropy

            return logprob_entropy(output, labels, **options)
        from megarl.kernels.fused_linear_logprob_entropy import fused_linear_logprob_entropy

        chunk = model.module
        weight = chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else chunk.output_layer.weight
        return fused_linear_logprob_entropy(output, weight, labels, **options)

    def _forward_step_log_probs(self, data_iterator, model):
        micro = next(data_iterator)
        device = current_device()
        output = model(micro["tokens"].to(device), micro["position_ids"].to(device), None)

        def collect(logits, non_loss_data=True):
            log_probs, entropy = self._log_probs_and_entropy(model, logits, micro["labels"].to(device))
            return {"rows": micro["rows"], "columns": micro["columns"], "log_probs": log_probs.float().cpu(), "entropy": entropy.float().cpu()}

        return output, collect

    # The update.

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Train on ``batch`` (with ``old_log_probs``, ``advantages``, ``loss_weights`` and, with a KL
        loss, ``ref_log_probs`` among its token values).

        Args:
            batch: the step's samples.
            step: the RL step, which seeds the mini-batch shuffling.

        Returns:
            Metrics averaged over the mini-batches: ``policy/loss``, ``policy/clip_fraction_low`` ...,
            ``policy/grad_norm``, ``policy/lr``, ``policy/skipped_steps``.
        """
        fields = ["old_log_probs", "advantages", "loss_weights"]
        if self.config.algorithm.use_kl_loss:
            fields.append("ref_log_probs")
        seed = self.config.train.seed * 1_000_003 + step
        metrics = self.model.update(batch, fields, self._forward_step_loss, len(UPDATE_METRICS), seed, _update_metrics)
        return {f"policy/{name}": value for name, value in metrics.items()}

    def _forward_step_loss(self, data_iterator, model):
        micro = next(data_iterator)
        device = current_device()
        output = model(micro["tokens"].to(device), micro["position_ids"].to(device), None)
        return output, functools.partial(self._loss, model, {name: value.to(device) for name, value in micro.items()})

    def _loss(self, model, micro: dict[str, torch.Tensor], output: torch.Tensor):
        """The micro-batch's ``(loss_sum, count, {"sums": UPDATE_METRICS})`` for Megatron."""
        algorithm = self.config.algorithm
        mask = micro["response_mask"]
        log_probs, entropy = self._log_probs_and_entropy(model, output, micro["labels"])
        per_token, loss_metrics = policy_loss(
            algorithm.policy_loss,
            log_probs=log_probs,
            old_log_probs=micro["old_log_probs"],
            advantages=micro["advantages"],
            response_mask=mask,
            clip_ratio_low=algorithm.clip_ratio_low,
            clip_ratio_high=algorithm.clip_ratio_high,
            clip_ratio_c=algorithm.clip_ratio_c,
        )
        per_token = per_token * micro["loss_weights"]
        if algorithm.entropy_coeff:
            per_token = per_token + entropy_bonus(entropy, mask, algorithm.entropy_coeff)
        kl = torch.zeros_like(per_token)
        if algorithm.use_kl_loss:
            kl = kl_loss(log_probs, micro["ref_log_probs"], mask, estimator=algorithm.kl_loss_estimator, coefficient=algorithm.kl_loss_coef)
            per_token = per_token + kl
        loss_sum, count = aggregate_micro_batch(
            per_token, micro, algorithm.loss_agg_mode, self.config.data.max_response_length, self.pg_collection.cp.rank()
        )
        tokens = mask.sum().to(torch.float64)
        weighted = {name: value.detach().double() * tokens for name, value in loss_metrics.items()}
        valid = mask.bool()
        sums = torch.stack(
            [
                loss_sum.detach().double(),
                count.double(),
                tokens,
                weighted["clip_fraction_low"],
                weighted["clip_fraction_high"],
                weighted["dual_clip_fraction"],
                weighted["approx_kl"],
                weighted["ratio_mean"],
                torch.where(valid, entropy.detach(), 0.0).sum().double(),
                torch.where(valid, kl.detach(), 0.0).sum().double(),
            ]
        )
        return loss_sum, count, {"sums": sums}


def _hidden_states_out(output_layer, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
    """The output layer's forward in the fused mode: its input, gathered along the sequence under
    sequence parallelism, instead of the logits. The fused kernel reduces the input's gradient over
    the tensor-parallel ranks itself, so the gather's backward only splits it."""
    if output_layer.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False, group=output_layer.tp_group)
    return hidden_states, None


def _update_metrics(sums: torch.Tensor) -> dict[str, float]:
    values = dict(zip(UPDATE_METRICS, sums.tolist()))
    tokens = max(values["tokens"], 1.0)
    metrics = {"loss": values["loss_sum"] / max(values["count"], 1.0)}
    for name in ("clip_fraction_low", "clip_fraction_high", "dual_clip_fraction", "approx_kl", "ratio_mean", "entropy", "kl_loss"):
        metrics[name] = values[name] / tokens
    return metrics

