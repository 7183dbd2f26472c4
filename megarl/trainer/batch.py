"""A step's samples as tensors, and the micro-batches Megatron consumes.

Every rank holds the whole :class:`TrainBatch` (the first rank rolls out, then broadcasts), so
advantages and filters are computed identically everywhere and no rank waits for another's
samples. Per-token tensors are ``[B, S]`` in *label space*: column ``t`` holds the value for
token ``t + 1``, the token predicted at position ``t`` (its log-prob, advantage, mask ...). The
last column is always masked. Sequences are right-padded, so causal attention needs no mask.

A micro-batch (:meth:`TrainBatch.micro_batch`) takes some rows, trims the columns to their longest
sequence rounded up to the layout's multiple (:func:`megarl.config.layout_multiple`: 2 x CP with
context parallelism, CP x TP with sequence parallelism) and, with context parallelism, keeps this
rank's two load-balanced chunks of every row. Results of forward passes come back through :func:`gather_token_values`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from megarl.data.datasets import Prompt
from megarl.data.padding import pad_micro_batch
from megarl.models.thd import packed_positions
from megarl.rollout.sampling import WeightSegment


@dataclasses.dataclass(frozen=True, slots=True)
class SampleText:
    """A sample as a person reads it (the generation files, :mod:`megarl.trainer.generations`)."""

    prompt: Prompt
    """The prompt it answers (its text, row fields and file)."""
    response: str
    """The response decoded; for an episode every turn after the prompt, observations included."""
    reward_extras: dict[str, float]
    """The extra numbers the reward function returned for it (empty: none, or it failed)."""


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
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False)
    """``[N, num_hidden_layers, k]`` the experts the engine routed tokens ``0 .. N-1`` of prompt +
    response to (``Sample.routed_experts``); None when the engine was not asked for them. Left out
    of ``==`` (an array has no single truth value)."""
    baseline: float | None = None
    """``algorithm.advantage_estimator: remax``: the score of one greedy answer to its prompt, the
    baseline its advantage subtracts; None otherwise."""
    teacher_log_probs: list[float] | None = None
    """``algorithm.use_opd``: the distillation teacher's log-prob of each response token given the
    prompt and the tokens before it (:meth:`EngineGroup.prompt_log_probs
    <megarl.rollout.group.EngineGroup.prompt_log_probs>`); None otherwise."""
    text: SampleText | None = dataclasses.field(default=None, compare=False)
    """Its prompt and response as text and the reward's extras, kept on the first rank for the
    generation files and validation; None for samples built without scoring."""

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
            the engine (and ``teacher_log_probs`` from the distillation teacher), then what the
            trainer adds (``old_log_probs``, ``sum_pi_squared`` for the optimal token baseline,
            ``ref_log_probs``, ``values``, ``advantages``, ``returns``, ``loss_weights``).
        pad_multiple: ``S`` and every micro-batch's length are multiples of it.
        routed_experts: ``[B, S, L, k]`` the experts each token is routed to in each of the model's
            ``L`` MoE layers (token space: row ``t`` is token ``t``), uint8 (int16 beyond 256
            experts), for routing replay; None without it (:func:`pack_routed_experts`).
        routed_lengths: ``[B]`` the tokens of each row whose experts came from the engine (or the
            recording pass); the rest hold a filler (:func:`pack_routed_experts`).
        reward_baselines: ``[B]`` ReMax's baselines (``ScoredSample.baseline``); None without them.
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    sequence_lengths: torch.Tensor
    response_lengths: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    token_values: dict[str, torch.Tensor]
    pad_multiple: int
    routed_experts: torch.Tensor | None = None
    routed_lengths: torch.Tensor | None = None
    reward_baselines: torch.Tensor | None = None

    @classmethod
    def from_scored(
        cls, samples: Sequence[ScoredSample], *, pad_token_id: int, pad_multiple: int, routing: tuple[Sequence[int], int] | None = None
    ) -> TrainBatch:
        """Pack scored samples (:meth:`from_samples`; the scores stay with the caller, ReMax's
        baselines go into ``reward_baselines``).

        Args:
            routing: ``(moe_layers, num_experts)`` to pack the samples' routed experts
                (:func:`pack_routed_experts`); None leaves ``routed_experts`` None.
        """
        batch = cls.from_samples(
            [sample.prompt_ids for sample in samples],
            [sample.response_ids for sample in samples],
            [sample.rollout_log_probs for sample in samples],
            [sample.group for sample in samples],
            [sample.truncated for sample in samples],
            pad_token_id=pad_token_id,
            pad_multiple=pad_multiple,
            loss_masks=[sample.loss_mask for sample in samples],
        )
        if routing is not None:
            moe_layers, num_experts = routing
            arrays = [sample.routed_experts for sample in samples]
            batch.routed_experts = pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], moe_layers, num_experts)
            batch.routed_lengths = torch.tensor([array.shape[0] for array in arrays], dtype=torch.int64)
        if samples and samples[0].baseline is not None:
            batch.reward_baselines = torch.tensor([sample.baseline for sample in samples], dtype=torch.float32)
        if samples and samples[0].teacher_log_probs is not None:
            batch.token_values["teacher_log_probs"] = torch.from_numpy(
                _label_space(
                    [sample.prompt_ids for sample in samples], [sample.response_ids for sample in samples],
                    [sample.teacher_log_probs for sample in samples], batch.tokens.shape, "teacher log-probs",
                )
            )
        return batch

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
            pad_multiple: from :func:`megarl.config.layout_multiple`.
            loss_masks: per sample, per response token, whether it is trained (None or none
                given: every token); an untrained token is left out of ``response_mask``.
        """
        padded = pad_micro_batch(prompt_ids, response_ids, pad_token_id=pad_token_id, pad_to_multiple_of=pad_multiple)
        batch_size, length = padded.tokens.shape
        # Filled in numpy, one torch tensor at the end (see pad_micro_batch).
        response_mask = np.zeros((batch_size, length), dtype=np.bool_)
        response_mask[:, :-1] = padded.loss_mask[:, 1:].numpy()
        log_probs = _label_space(prompt_ids, response_ids, rollout_log_probs, (batch_size, length), "rollout log-probs")
        for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            trained = loss_masks[row] if loss_masks else None
            if trained is not None:
                if len(trained) != len(response):
                    raise ValueError(f"sample {row}: a loss mask of {len(trained)} tokens for {len(response)} response tokens")
                start = len(prompt) - 1
                response_mask[row, start : start + len(response)] &= np.asarray(trained, dtype=np.bool_)
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
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("token_values", "pad_multiple") and getattr(self, field.name) is not None
        }
        return {**fields, **{f"token_values/{name}": values for name, values in self.token_values.items()}}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], *, pad_multiple: int) -> TrainBatch:
        """The batch whose :meth:`tensors` are ``named``."""
        token_values = {name.removeprefix("token_values/"): tensor for name, tensor in named.items() if name.startswith("token_values/")}
        fields = {name: tensor for name, tensor in named.items() if not name.startswith("token_values/")}
        return cls(**fields, token_values=token_values, pad_multiple=pad_multiple)

    def micro_batch(
        self, rows: Sequence[int], fields: Sequence[str], *, cp_rank: int = 0, cp_size: int = 1, length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs and per-token values for ``rows``, on this context-parallel rank.

        Args:
            length: the columns to keep (a multiple of ``pad_multiple``, at least the rows' longest
                sequence); None: the rows' longest sequence rounded up to ``pad_multiple``.

        Returns:
            ``tokens``, ``position_ids``, ``labels`` (the next token), ``response_mask`` and each of
            ``fields``, all ``[b, s]`` (``s`` this rank's columns); ``rows [b]`` and ``columns [s]``
            (where they sit in the batch); ``response_lengths [b]`` (whole responses) and
            ``sequence_lengths [b]``; per token ``[b, s]``, ``token_rows``/``token_columns`` (its
            place in the batch) and ``token_valid`` (a real token, not padding); with routing replay
            ``routed_experts [b, s, L, k]`` and ``token_routed`` (routed by the engine, not filler).
            :mod:`megarl.trainer.packing` makes the packed micro-batches, with the same per-token
            names.
        """
        rows = torch.as_tensor(list(rows), dtype=torch.int64)
        length = length or self.micro_batch_length(rows)
        # Megatron's load balancing for causal attention: chunks r and 2 CP - 1 - r of 2 CP.
        columns = packed_positions([0, length], cp_rank, cp_size)
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
            "sequence_lengths": self.sequence_lengths[rows],
        }
        for name in fields:
            batch[name] = self.token_values[name][rows][:, columns]
        token_columns = columns.expand(len(rows), -1)
        batch["token_rows"] = rows[:, None].expand(-1, len(columns))
        batch["token_columns"] = token_columns
        batch["token_valid"] = token_columns < self.sequence_lengths[rows][:, None]
        if self.routed_experts is not None:
            routed_lengths = self.sequence_lengths if self.routed_lengths is None else self.routed_lengths
            batch["routed_experts"] = self.routed_experts[rows][:, columns]
            batch["token_routed"] = batch["token_valid"] & (token_columns < routed_lengths[rows][:, None])
        return batch

    def micro_batch_length(self, rows: Sequence[int] | torch.Tensor) -> int:
        """The columns a micro-batch of ``rows`` needs: their longest sequence rounded up to
        ``pad_multiple``."""
        return _round_up(int(self.sequence_lengths[torch.as_tensor(rows, dtype=torch.int64)].max()), self.pad_multiple)

    def empty_token_values(self) -> torch.Tensor:
        """Zeros shaped like a per-token value, ``[B, S]`` float32."""
        return torch.zeros(self.tokens.shape, dtype=torch.float32)


def _label_space(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], values: Sequence[Sequence[float]], shape: tuple[int, int], what: str
) -> np.ndarray:
    """Per-response-token values as a ``[B, S]`` float32 array in label space (a response's token
    ``j`` in column ``len(prompt) - 1 + j``), 0 elsewhere.

    Raises:
        ValueError: a sample with another number of values than response tokens, naming ``what``.
    """
    placed = np.zeros(shape, dtype=np.float32)
    for row, (prompt, response, row_values) in enumerate(zip(prompt_ids, response_ids, values)):
        if len(row_values) != len(response):
            raise ValueError(f"sample {row}: {len(row_values)} {what} for {len(response)} response tokens")
        start = len(prompt) - 1
        placed[row, start : start + len(row_values)] = row_values
    return placed


def pack_routed_experts(arrays: Sequence[np.ndarray | None], sequence_lengths: torch.Tensor, length: int, moe_layers: Sequence[int], num_experts: int) -> torch.Tensor:
    """The routed experts of a batch's samples as one ``[B, S, L, k]`` tensor (``L`` MoE layers).

    Args:
        arrays: per sample, the engine's ``[N, num_hidden_layers, k]`` experts of tokens ``0 .. N-1``
            (SGLang's ``routed_experts``: every token but the last one generated).
        sequence_lengths: ``[B]`` prompt + response tokens of each sample.
        length: ``S``, the batch's padded length.
        moe_layers: the indices of the model's MoE layers among its ``num_hidden_layers``.
        num_experts: routed experts per MoE layer.

    Tokens an array does not cover (the last one, padding) get :func:`routing_filler`'s experts:
    under causal attention no trained log-prob depends on them.

    Raises:
        ValueError: a sample without routed experts, or with an array of the wrong shape or with
            experts out of range, naming the sample.
    """
    if not arrays or arrays[0] is None:
        raise ValueError("sample 0 has no routed experts: routing replay needs the engines to return them")
    topk = arrays[0].shape[-1]
    packed = routing_filler(length, topk, num_experts)[:, None, :].expand(len(arrays), length, len(moe_layers), topk).clone()
    for row, array in enumerate(arrays):
        tokens = int(sequence_lengths[row])
        if array is None:
            raise ValueError(f"sample {row} has no routed experts: routing replay needs the engines to return them")
        if array.ndim != 3 or array.shape[0] > tokens or array.shape[2] != topk or array.shape[1] <= max(moe_layers):
            raise ValueError(
                f"sample {row}: routed experts of shape {tuple(array.shape)} for {tokens} tokens; expected "
                f"[<= {tokens}, > {max(moe_layers)} layers, {topk}]"
            )
        chosen = array[:, list(moe_layers), :]
        if chosen.size and (chosen.min() < 0 or chosen.max() >= num_experts):
            raise ValueError(f"sample {row}: routed experts outside 0 .. {num_experts - 1}")
        packed[row, : array.shape[0]] = torch.from_numpy(chosen.astype(np.int64)).to(packed.dtype)
    return packed


def routed_experts_dtype(num_experts: int) -> torch.dtype:
    """The dtype of ``TrainBatch.routed_experts``: uint8 up to 256 experts, else int16."""
    return torch.uint8 if num_experts <= 256 else torch.int16


def routing_filler(length: int, topk: int, num_experts: int) -> torch.Tensor:
    """``[length, k]`` experts for the tokens no routing was recorded for (each sample's last
    token, padding): position ``t`` goes to experts ``(t * k + j) mod E``, spread over all of them
    so that the filler does not load a few experts (capacity, the expert-bias update count tokens
    per expert)."""
    positions = torch.arange(length)[:, None] * topk + torch.arange(topk)[None, :]
    return (positions % num_experts).to(routed_experts_dtype(num_experts))


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
