"""A step's samples as tensors, and the micro-batches Megatron consumes.

Every rank holds the whole :class:`TrainBatch` (the first rank rolls out, then broadcasts), so
advantages and filters are computed identically everywhere and no rank waits for another's
samples. Per-token tensors are ``[B, S]`` in *label space*: column ``t`` holds the value for
token ``t + 1``, the token predicted at position ``t`` (its log-prob, advantage, mask ...). The
last column is always masked. Sequences are right-padded, so causal attention needs no mask.

A micro-batch (:meth:`TrainBatch.micro_batch`) takes some rows, trims the columns to their longest
sequence rounded up to the layout's multiple (TP with sequence parallelism, 2 x CP with context
parallelism) and, with context parallelism, keeps this rank's two load-balanced chunks of every
row. Results of forward passes come back through :func:`gather_token_values`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megarl.data.padding import pad_micro_batch
from megarl.rollout.sampling import WeightSegment


def layout_multiple(tensor_parallel: int, sequence_parallel: bool, context_parallel: int) -> int:
    """The multiple every micro-batch's sequence length is rounded up to: TP with sequence
    parallelism (the sequence is split over TP ranks), 2 x CP with context parallelism."""
    return math.lcm(tensor_parallel if sequence_parallel else 1, 2 * context_parallel if context_parallel > 1 else 1)


def context_parallel_positions(length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The columns context-parallel rank ``cp_rank`` keeps of a ``length``-long sequence: chunks
    ``cp_rank`` and ``2 cp_size - 1 - cp_rank`` of ``2 cp_size`` (Megatron's load balancing for
    causal attention). ``length`` must be a multiple of ``2 cp_size``."""
    if cp_size == 1:
        return torch.arange(length)
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


@dataclasses.dataclass(slots=True)
class ScoredSample:
    """One response as the rollout hands it to the trainer: the tokens it trains on, the engine's
    log-probs, and its score."""

    prompt_ids: list[int]
    """The prompt's tokens."""
    response_ids: list[int]
    """The generated tokens."""
    rollout_log_probs: list[float]
    """The engine's log-prob of each response token."""
    finish_reason: str
    """``stop`` (an EOS or stop token) or ``length`` (the response hit the length limit)."""
    group: int
    """The prompt it answers, unique within the step: the samples of one prompt form a group."""
    score: float
    """The reward."""
    weight_version: str | None = None
    """The engine's weight version that generated its last token (``None``: not reported)."""
    weight_segments: tuple[WeightSegment, ...] = ()
    """Which weights generated which response tokens, oldest first (``Sample.weight_segments``);
    its staleness comes from the first (:mod:`megarl.trainer.staleness`)."""
    loss_mask: list[bool] | None = None
    """Per response token, whether the loss trains on it; None: every one
    (``rollout.mask_offpolicy_in_partial_rollout`` leaves out the tokens of older weights)."""
    routed_experts: np.ndarray | None = None
    """``[N, num_layers, topk]`` uint8 or int16: the engine's routed experts of tokens ``[0, N)`` of
    prompt + response (``Sample.routed_experts``; a trajectory's: its last model turn's), N at most
    ``len(prompt_ids) + len(response_ids) - 1``; None unless ``algorithm.routing_replay`` is r3."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclasses.dataclass
class TrainBatch:
    """The samples of one RL step; identical on every rank.

    Attributes:
        tokens: ``[B, S]`` int64, prompt then response, right-padded.
        response_mask: ``[B, S]`` bool, label space: true where the predicted token is a
            response token that is trained on.
        sequence_lengths: ``[B]`` prompt + response tokens.
        response_lengths: ``[B]`` response tokens.
        group_ids: ``[B]`` the prompt each sample answers (GRPO's groups).
        truncated: ``[B]`` bool, the response hit the length limit.
        token_values: named ``[B, S]`` float tensors in label space: ``rollout_log_probs`` from
            the engine, then what the trainer adds (``old_log_probs``, ``ref_log_probs``,
            ``values``, ``advantages``, ``returns``, ``loss_weights``).
        pad_multiple: ``S`` and every micro-batch's length are multiples of it.
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    sequence_lengths: torch.Tensor
    response_lengths: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    token_values: dict[str, torch.Tensor]
    pad_multiple: int

    @classmethod
    def from_scored(cls, samples: Sequence[ScoredSample], *, pad_token_id: int, pad_multiple: int) -> TrainBatch:
        """Pack scored samples (:meth:`from_samples`; the scores stay with the caller)."""
        return cls.from_samples(
            [sample.prompt_ids for sample in samples],
            [sample.response_ids for sample in samples],
            [sample.rollout_log_probs for sample in samples],
            [sample.group for sample in samples],
            [sample.truncated for sample in samples],
            pad_token_id=pad_token_id,
            pad_multiple=pad_multiple,
            loss_masks=[sample.loss_mask for sample in samples],
        )

    @classmethod
    def from_samples(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        rollout_log_probs: Sequence[Sequence[float]],
        group_ids: Sequence[int],
        truncated: Sequence[bool],
        *,
        pad_token_id: int,
        pad_multiple: int,
        loss_masks: Sequence[Sequence[bool] | None] = (),
    ) -> TrainBatch:
        """Pack samples into tensors.

        Args:
            prompt_ids, response_ids: each sample's tokens.
            rollout_log_probs: the engine's log-prob of each response token.
            group_ids: the prompt each sample answers.
            truncated: each response hit the length limit.
            pad_token_id: written into padding (never scored).
            pad_multiple: from :func:`layout_multiple`.
            loss_masks: per sample, per response token, whether it is trained (None or none
                given: every token); an untrained token is left out of ``response_mask``.
        """
        padded = pad_micro_batch(prompt_ids, response_ids, pad_token_id=pad_token_id, pad_to_multiple_of=pad_multiple)
        batch_size, length = padded.tokens.shape
        # Filled in numpy, one torch tensor at the end (see pad_micro_batch).
        response_mask = np.zeros((batch_size, length), dtype=np.bool_)
        response_mask[:, :-1] = padded.loss_mask[:, 1:].numpy()
        log_probs = np.zeros((batch_size, length), dtype=np.float32)
        for row, (prompt, values) in enumerate(zip(prompt_ids, rollout_log_probs)):
            if len(values) != len(response_ids[row]):
                raise ValueError(f"sample {row}: {len(values)} rollout log-probs for {len(response_ids[row])} response tokens")
            start = len(prompt) - 1
            log_probs[row, start : start + len(values)] = values
            trained = loss_masks[row] if loss_masks else None
            if trained is not None:
                if len(trained) != len(values):
                    raise ValueError(f"sample {row}: a loss mask of {len(trained)} tokens for {len(values)} response tokens")
                response_mask[row, start : start + len(values)] &= np.asarray(trained, dtype=np.bool_)
        return cls(
            tokens=padded.tokens,
            response_mask=torch.from_numpy(response_mask),
            sequence_lengths=padded.sequence_lengths,
            response_lengths=torch.tensor([len(response) for response in response_ids], dtype=torch.int64),
            group_ids=torch.as_tensor(list(group_ids), dtype=torch.int64),
            truncated=torch.as_tensor(list(truncated), dtype=torch.bool),
            token_values={"rollout_log_probs": torch.from_numpy(log_probs)},
            pad_multiple=pad_multiple,
        )

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the batch by name (``token_values`` as ``token_values/<name>``): what
        :meth:`from_tensors` takes back, e.g. after a broadcast."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name not in ("token_values", "pad_multiple")}
        return {**fields, **{f"token_values/{name}": values for name, values in self.token_values.items()}}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], *, pad_multiple: int) -> TrainBatch:
        """The batch whose :meth:`tensors` are ``named``."""
        token_values = {name.removeprefix("token_values/"): tensor for name, tensor in named.items() if name.startswith("token_values/")}
        fields = {name: tensor for name, tensor in named.items() if not name.startswith("token_values/")}
        return cls(**fields, token_values=token_values, pad_multiple=pad_multiple)

    def micro_batch(self, rows: Sequence[int], fields: Sequence[str], *, cp_rank: int = 0, cp_size: int = 1) -> dict[str, torch.Tensor]:
        """Model inputs and per-token values for ``rows``, on this context-parallel rank.

        Returns:
            ``tokens``, ``position_ids``, ``labels`` (the next token), ``response_mask`` and each of
            ``fields``, all ``[b, s]`` (``s`` this rank's columns); ``rows [b]`` and ``columns [s]``
            (where they sit in the batch); ``response_lengths [b]`` (whole responses).
        """
        rows = torch.as_tensor(list(rows), dtype=torch.int64)
        length = _round_up(int(self.sequence_lengths[rows].max()), self.pad_multiple)
        columns = context_parallel_positions(length, cp_rank, cp_size)
        tokens = self.tokens[rows, :length]
        labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
        batch = {
            "tokens": tokens[:, columns],
            "position_ids": columns.expand(len(rows), -1).contiguous(),
            "labels": labels[:, columns],
            "response_mask": self.response_mask[rows][:, columns],
            "rows": rows,
            "columns": columns,
            "response_lengths": self.response_lengths[rows],
        }
        for name in fields:
            batch[name] = self.token_values[name][rows][:, columns]
        return batch

    def empty_token_values(self) -> torch.Tensor:
        """Zeros shaped like a per-token value, ``[B, S]`` float32."""
        return torch.zeros(self.tokens.shape, dtype=torch.float32)


def gather_token_values(local: torch.Tensor, pg_collection, *, is_last_stage: bool) -> torch.Tensor:
    """Combine per-token results that each rank computed for its own rows and columns.

    Every data- and context-parallel rank wrote its rows/columns into a zero ``[B, S]`` tensor
    (the others stay 0, and ``x + 0`` is exact); tensor-parallel ranks hold identical copies.
    Only the last pipeline stage computed anything: it shares the result with the other stages.

    Args:
        local: ``[B, S]`` this rank's contribution (zeros except its own rows and columns).
        pg_collection: the process groups.
        is_last_stage: whether this rank is on the last pipeline stage.

    Returns:
        ``[B, S]``, the full result, on every rank.
    """
    if pg_collection.dp_cp.size() > 1:
        dist.all_reduce(local, group=pg_collection.dp_cp)
    if pg_collection.pp.size() > 1:
        if not is_last_stage:
            local.zero_()
        # A sum over the stages is the last stage's tensor: the others contribute zeros.
        dist.all_reduce(local, group=pg_collection.pp)
    return local


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple
