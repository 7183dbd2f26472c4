"""The distillation teacher in Megatron (``algorithm.opd_type: megatron``): a second model beside the
policy, forward only, that scores every trained token.

On-policy distillation needs, for each response token ``y_t`` of a trained sample, the teacher's
``log pi_T(y_t | x, y_<t)`` (:mod:`megarl.algorithms.distillation`). With ``opd_type: sglang`` the
teacher's engines answer it as prompt log-probs before the batch is packed
(:func:`megarl.trainer.rollout.add_teacher_log_probs`). Here every rank holds its shard of the
teacher, built once at set-up from ``teacher.path`` on the policy's process groups under the
training layout (without expert parallelism when the teacher is dense:
:meth:`~megarl.config.ParallelConfig.for_model`), and each step runs it over the shared batch
after the old log-probs, through the policy's forward step, micro-batching and log-prob kernels
(the fused hidden-states path with ``train.fused_linear_logprob``), at temperature 1: the log
softmax of its raw logits, which is what an engine's prompt log-probs are. The values land where
the engine mode puts them: ``batch.token_values["teacher_log_probs"]``, ``[B, S]`` in label space,
0 outside the response mask; ``time/teacher_s`` times the pass.

The teacher may be of another architecture than the policy (the bundled ``tiny-teacher`` is a
dense Qwen3 twice the tiny MoE's width), but it shares the policy's tokenizer and the training
layout must fit it: the preflight checks both (:mod:`megarl.preflight`). Its weights stay resident
on the training devices for the whole run, in ``model.dtype`` (the engine mode needs GPUs of its
own instead).

Departures from slime's ``--opd-type megatron``, deliberate: the teacher is read from a HF
directory by the policy's loader (slime: a Megatron checkpoint, ``--opd-teacher-load``), so any
family megarl builds can teach without a conversion; it is not saved in checkpoints (a resumed run
loads it again from ``teacher.path``); an MoE teacher routes on its own and drops no token (the
student's capacity factor and router losses are training settings).
"""

from __future__ import annotations

import time

import torch

from megarl.config import Config, ModelFacts, resolve_model_path
from megarl.models.specs import Backend
from megarl.trainer.batch import TrainBatch
from megarl.trainer.model import TrainModel
from megarl.trainer.policy import attach_hidden_states_heads, token_log_probs_and_entropy

TEACHER_TEMPERATURE = 1.0
"""The teacher's log-probs are of its raw logits (``algorithm.use_opd`` needs the policy's sampling
temperature to be 1 too: :mod:`megarl.config.checks`)."""


class MegatronTeacher:
    """The distillation teacher's shard on this rank, forward only.

    Args:
        model: built by :meth:`TrainModel.build_forward_only` (with
            :func:`~megarl.trainer.policy.attach_hidden_states_heads` when ``fused_linear_logprob``).
        fused_linear_logprob: ``train.fused_linear_logprob``: log-probs from the hidden states and
            the output weight's vocabulary shard, never the whole logits.
    """

    def __init__(self, model: TrainModel, *, fused_linear_logprob: bool):
        self.model = model
        self.fused_linear_logprob = fused_linear_logprob

    @classmethod
    def build(cls, config: Config, *, pg_collection, backend: Backend) -> MegatronTeacher:
        """Load ``teacher.path`` under the training layout (collective; once, at set-up).

        Args:
            config: the run's config: ``teacher.path``, ``parallel``, ``model.dtype`` and its MoE
                execution settings, ``train`` (micro-batching, the fused log-prob path).
            pg_collection: the policy's process groups.
            backend: layer specs, the policy's.
        """
        teacher_dir = resolve_model_path(config.teacher.path)
        layout = config.parallel.for_model(ModelFacts.from_hf_dir(teacher_dir))
        fused = config.train.fused_linear_logprob
        model = TrainModel.build_forward_only(
            str(teacher_dir), config.model, layout, config.train, pg_collection=pg_collection, backend=backend,
            after_load=attach_hidden_states_heads if fused else None,
        )
        return cls(model, fused_linear_logprob=fused)

    def log_probs(self, batch: TrainBatch) -> torch.Tensor:
        """The teacher's log-prob of every trained token given the tokens before it (collective).

        Returns:
            ``[B, S]`` float32 in label space, the same on every rank, 0 outside the response mask.
        """
        return self.model.forward(batch, ("log_probs",), self._token_log_probs)["log_probs"]

    def _token_log_probs(self, micro: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, torch.Tensor]:
        options = dict(temperature=TEACHER_TEMPERATURE, fused_linear_logprob=self.fused_linear_logprob)
        log_probs, _ = token_log_probs_and_entropy(self.model, output, micro, **options)
        return {"log_probs": log_probs}

    def score(self, batch: TrainBatch) -> dict[str, float]:
        """Put the teacher's log-probs into ``batch.token_values["teacher_log_probs"]`` (collective).

        Returns:
            ``time/teacher_s``, the pass's seconds.
        """
        start = time.perf_counter()
        batch.token_values["teacher_log_probs"] = self.log_probs(batch)
        return {"time/teacher_s": time.perf_counter() - start}
