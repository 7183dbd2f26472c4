"""The distillation teacher in Megatron beside the policy (the ``teacher`` check of a layout job,
tests/workers/suite.py).

The policy is built as the trainer builds it (:meth:`TrainModel.build` with the hidden-states head),
the teacher as :func:`megarl.trainer.run.setup` builds it with ``algorithm.opd_type: megatron``
(:meth:`MegatronTeacher.build`: forward only, under the training layout, without expert parallelism
when it is dense). One batch of samples of different lengths goes through the policy's
old-log-prob pass and through the teacher, packed and then padded, both with the fused log-prob
path (the hidden-states head) or both from the logits. The report (rank 0): the largest
difference between the teacher's log-probs and the policy's (equal when the teacher is the policy's
own model) and transformers' of the same tokens on the teacher's HF model; that the values are 0
outside the response mask; and what the teacher holds on every rank: no parameter that takes a
gradient, no optimizer (an update is refused), no DDP wrapper, in eval mode, none of the policy's
parameters.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import transformers

from megarl.config import AlgorithmConfig, Config, ModelConfig, TeacherConfig, TrainConfig
from megarl.trainer.model import TrainModel
from megarl.trainer.policy import HiddenStatesHead, Policy, attach_hidden_states_heads
from megarl.trainer.teacher import MegatronTeacher
from packing_check import LENGTHS, MAX_RESPONSE, _batch


def transformers_log_probs(teacher_dir: str, batch) -> torch.Tensor:
    """``[B, S]`` label space: transformers' log-prob of each token given the tokens before it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    expected = torch.zeros(batch.tokens.shape)
    with torch.no_grad():
        for row, length in enumerate(batch.sequence_lengths.tolist()):
            tokens = batch.tokens[row, :length]
            log_probs = torch.log_softmax(model(tokens[None]).logits[0].float(), dim=-1)
            expected[row, : length - 1] = log_probs[:-1].gather(-1, tokens[1:, None])[:, 0]
    return expected


def check(model_dir: str, layout, pg_collection, teachers: list[str], fused_linear_logprob: bool = True) -> dict | None:
    """The policy of ``model_dir`` against each of ``teachers`` (HF directories), both with
    ``train.fused_linear_logprob`` as given; on rank 0 the report of each by directory, None elsewhere."""
    train = TrainConfig(
        micro_batch_size=2, mini_batch_size=len(LENGTHS), global_batch_size=len(LENGTHS), use_distributed_optimizer=False,
        fused_linear_logprob=fused_linear_logprob,
    )
    algorithm = AlgorithmConfig(use_opd=True, opd_type="megatron")
    model = TrainModel.build(
        model_dir, ModelConfig(path=model_dir), layout, train, train.optimizer, pg_collection=pg_collection, backend="torch",
        after_load=attach_hidden_states_heads if fused_linear_logprob else None,
    )
    policy = Policy(model, algorithm, train, temperature=1.0, max_response_length=MAX_RESPONSE)
    batch = _batch(model, layout, replay=False)
    old = policy.old_log_probs(batch)[0]["old_log_probs"]
    policy_parameters = {id(parameter) for chunk in model.chunks for parameter in chunk.parameters()}
    reports = {}
    for teacher in teachers:
        config = Config(model=ModelConfig(path=model_dir), parallel=layout, train=train, teacher=TeacherConfig(path=teacher), algorithm=algorithm)
        reports[teacher] = _against_policy(MegatronTeacher.build(config, pg_collection=pg_collection, backend="torch"), teacher, batch, old, policy_parameters)
    return reports if dist.get_rank() == 0 else None


def _against_policy(teacher_model: MegatronTeacher, teacher: str, batch, old: torch.Tensor, policy_parameters: set[int]) -> dict:
    mask = batch.response_mask
    found = {"packed": teacher_model.log_probs(batch)}
    train = teacher_model.model.train
    teacher_model.model.train = dataclasses.replace(train, packing=False)
    found["padded"] = teacher_model.log_probs(batch)
    teacher_model.model.train = train
    expected = transformers_log_probs(teacher, batch)
    chunks = teacher_model.model.chunks
    holds = {
        "frozen": all(not parameter.requires_grad for chunk in chunks for parameter in chunk.parameters()),
        "eval": not any(chunk.training for chunk in chunks),
        "no_optimizer": teacher_model.model.optimizer is None and teacher_model.model.scheduler is None,
        "no_ddp": [id(chunk) for chunk in teacher_model.model.models] == [id(chunk) for chunk in chunks],
        "own_parameters": not any(id(parameter) in policy_parameters for chunk in chunks for parameter in chunk.parameters()),
        "expert_parallel": teacher_model.model.spec.transformer_config.expert_model_parallel_size,
        "fused": teacher_model.fused_linear_logprob and any(isinstance(chunk.output_layer, HiddenStatesHead) for chunk in chunks if chunk.post_process),
    }
    try:
        teacher_model.model.update(batch, objective=None, seed=0)
        holds["update_refused"] = False
    except RuntimeError:
        holds["update_refused"] = True
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, holds)
    return {
        "ranks": everyone,
        "policy_diff": max(float((values - old)[mask].abs().max()) for values in found.values()),
        "transformers_diff": max(float((values - expected)[mask].abs().max()) for values in found.values()),
        "outside_mask": max(float(values[~mask].abs().max()) for values in found.values()),
        "tokens": int(mask.sum()),
        "log_prob_mean": float(found["packed"][mask].mean()),
    }
