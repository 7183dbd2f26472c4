"""Weight mapping rules: which HuggingFace tensors make up each Megatron parameter shard.

One set of rules serves loading (HF -> Megatron), export (Megatron -> HF) and the weight stream to
the rollout engines. A rule describes a Megatron parameter as a concatenation, along one dimension,
of slices of HF tensors, for any tensor-parallel rank:

- :class:`Replicated`: the same tensor on every rank (norms, router, biases of row-parallel layers).
- :class:`ColumnParallel` / :class:`RowParallel`: one HF tensor split along dim 0 / dim 1.
- :class:`VocabParallel`: embeddings and output layer, split along the vocab and padded past the
  real vocabulary with zero rows (the padding exists only on the Megatron side).
- :class:`FusedQKV`: ``q_proj``, ``k_proj``, ``v_proj`` interleaved per query group
  (``[q of group g; k of group g; v of group g]`` for each group), split by groups.
- :class:`FusedGateUp`: ``gate_proj`` and ``up_proj`` stacked, each split separately, so every TP
  rank holds ``[gate shard; up shard]``.

:meth:`Rule.segments` answers "which HF slices, in which order, form this rank's shard"; the loader
reads exactly those slices, the exporter writes them back, and the stream plans copies from them.
Names are templates: ``{layer}`` is the global layer index and ``{expert}`` the global expert id.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """``stop - start`` consecutive entries along the rule's dimension.

    ``hf_name`` None is padding (zeros on the Megatron side, absent from HF).
    """

    hf_name: str | None
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A Megatron parameter and the HF tensors it is made of."""

    megatron: str
    """Megatron parameter name template (per-layer names relative to ``decoder.layers.{layer}.``
    are written in full, e.g. ``decoder.layers.{layer}.self_attention.linear_proj.weight``)."""
    hf: tuple[str, ...]
    """HF tensor name templates, in the order the segments use them."""
    dim: int = 0
    """The dimension along which segments are concatenated and tensor parallelism splits."""
    parallel: bool = True
    """Split over tensor parallelism (TP, or ETP for expert weights); False: replicated."""
    is_expert: bool | None = None
    """An expert weight: split by ETP, spread over EP. Derived from the template (names that carry
    ``{expert}``) and kept by :meth:`instantiate` once the id is filled in."""

    def __post_init__(self):
        if self.is_expert is None:
            object.__setattr__(self, "is_expert", "{expert}" in self.megatron)

    def segments(self, local_length: int, rank: int, size: int) -> list[Segment]:
        """The HF slices (in order along :attr:`dim`) that form tensor-parallel shard ``rank``.

        Args:
            local_length: the shard's length along :attr:`dim` (the Megatron parameter's).
            rank: this rank in the tensor-parallel group (ETP group for expert weights).
            size: that group's size.
        """
        (name,) = self.hf
        if not self.parallel:
            return [Segment(name, 0, local_length)]
        return [Segment(name, rank * local_length, (rank + 1) * local_length)]

    def hf_lengths(self, local_length: int, size: int) -> dict[str, int]:
        """Each HF tensor's full length along :attr:`dim`, from the shard length."""
        lengths: dict[str, int] = {}
        for rank in range(size):
            for segment in self.segments(local_length, rank, size):
                if segment.hf_name is not None:
                    lengths[segment.hf_name] = max(lengths.get(segment.hf_name, 0), segment.stop)
        return lengths

    def instantiate(self, layer: int | None = None, expert: int | None = None) -> Rule:
        """This rule with ``{layer}`` and ``{expert}`` filled in."""
        if self.is_expert and expert is None:
            raise ValueError(f"{self.megatron} is an expert weight: give the expert id")
        values = {"layer": layer, "expert": expert}
        return dataclasses.replace(
            self,
            megatron=self.megatron.format(**values),
            hf=tuple(name.format(**values) for name in self.hf),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Replicated(Rule):
    parallel: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ColumnParallel(Rule):
    dim: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class RowParallel(Rule):
    dim: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class VocabParallel(Rule):
    """Embedding or output layer: rows split over TP; rows past ``vocab_size`` are padding."""

    vocab_size: int = 0

    def segments(self, local_length, rank, size):
        (name,) = self.hf
        vocab = self.vocab_size
        start, stop = rank * local_length, (rank + 1) * local_length
        segments = []
        if start < vocab:
            segments.append(Segment(name, start, min(stop, vocab)))
        real_stop = max(start, min(stop, vocab))
        if stop > real_stop:
            segments.append(Segment(None, 0, stop - real_stop))
        return segments


@dataclasses.dataclass(frozen=True, slots=True)
class FusedQKV(Rule):
    """``hf = (q_proj, k_proj, v_proj)`` (weights or biases) interleaved per query group.

    The whole fused tensor is ``[q of group g; k of group g; v of group g]`` for each group, and
    tensor-parallel rank ``r`` holds rows ``[r * local_length, (r + 1) * local_length)`` of it: whole
    groups when TP divides the query groups, and with fewer query groups than TP ranks a part of
    one group's rows (megatron-core all-gathers the projection and each rank takes its heads).
    """

    num_query_groups: int = 0
    heads_per_group: int = 0
    head_dim: int = 0

    def segments(self, local_length, rank, size):
        q_name, k_name, v_name = self.hf
        q_rows = self.heads_per_group * self.head_dim
        start, stop = rank * local_length, (rank + 1) * local_length
        segments, offset = [], 0
        for group in range(self.num_query_groups):
            for name, first, length in (
                (q_name, group * q_rows, q_rows),
                (k_name, group * self.head_dim, self.head_dim),
                (v_name, group * self.head_dim, self.head_dim),
            ):
                # This piece covers rows [offset, offset + length) of the fused tensor.
                low, high = max(start, offset), min(stop, offset + length)
                if low < high:
                    segments.append(Segment(name, first + low - offset, first + high - offset))
                offset += length
        return segments


@dataclasses.dataclass(frozen=True, slots=True)
class FusedGateUp(Rule):
    """``hf = (gate_proj, up_proj)``: each rank holds ``[gate shard; up shard]``."""

    def segments(self, local_length, rank, size):
        gate, up = self.hf
        half = local_length // 2
        return [Segment(gate, rank * half, (rank + 1) * half), Segment(up, rank * half, (rank + 1) * half)]
