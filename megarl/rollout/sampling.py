"""What a rollout asks for (sampling parameters) and what it gets back (samples).

Log-probabilities follow SGLang's semantics, which the ``hf`` engine reproduces exactly:

- sampling (``temperature > 0``): ``log_softmax(logits / temperature)`` at the sampled token, over
  the full vocabulary, computed in fp32. top-p and top-k only restrict which tokens can be drawn;
  the reported log-prob is *not* renormalised over the kept tokens (SGLang's sampler takes it
  before filtering). With top-p and top-k off this is exactly the distribution the tokens were
  drawn from, and what the trainer recomputes when it divides its logits by the temperature.
- greedy (``temperature == 0``): ``log_softmax(logits)`` at the argmax (SGLang treats greedy as
  top-k 1 at temperature 1).

Seeds: each sample gets its own seed, derived from ``SamplingParams.seed``, its prompt's index in
the call and its index among the prompt's samples (:func:`sample_seed`), and sent as SGLang's
``sampling_seed``. So the same seed and the same prompts give the same generations whatever the
number of engines or how prompts are batched, and a request re-sent after an engine restart draws
the same tokens. SGLang honours ``sampling_seed`` only when launched with
``--enable-deterministic-inference``; the ``hf`` engine always does. A partial sample (aborted at
a weight update) resumes with :func:`resume_seed`, a hash of its own seed and the number of
tokens it already has: the same partial resumes the same way, and the continuation does not
replay the random draws that produced the first tokens.

Weight versions: every sample records which weights generated which of its tokens, as SGLang's
``meta_info.weight_versions`` spans (:class:`WeightSegment`). A sample generated without an update
under way has one segment; one paused in place across an update, or aborted and resumed
(:meth:`Sample.continued_by`), has one per version, oldest first.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

_MASK_64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """Sampling of one ``generate`` call."""

    max_new_tokens: int
    """Response length limit, tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus threshold in (0, 1]; 1 is off."""
    top_k: int = -1
    """Top-k; -1 is off."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response besides the model's EOS tokens; the stop token is part of it."""
    n: int = 1
    """Responses per prompt; all of a prompt's responses go to the same engine (prefix cache)."""
    seed: int | None = None
    """Base of the per-sample seeds; None draws from the engine's own random state."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature ({self.temperature}) must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p ({self.top_p}) must be in (0, 1]")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k ({self.top_k}) must be -1 (off) or >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n ({self.n}) must be >= 1")

    @classmethod
    def from_config(cls, rollout, *, max_new_tokens: int, seed: int | None, validation: bool = False) -> SamplingParams:
        """Training (or validation) sampling from a :class:`megarl.config.RolloutConfig`.

        Args:
            rollout: the ``rollout`` config section.
            max_new_tokens: ``data.max_response_length``.
            seed: this call's seed, e.g. ``rollout.seed`` combined with the step, so that steps
                draw different noise and a rerun draws the same.
            validation: use ``val_temperature``, ``val_top_p``, ``val_top_k`` and
                ``val_n_samples`` (greedy by default) instead of the training ones.
        """
        return cls(
            max_new_tokens=max_new_tokens,
            temperature=rollout.val_temperature if validation else rollout.temperature,
            top_p=rollout.val_top_p if validation else rollout.top_p,
            top_k=rollout.val_top_k if validation else rollout.top_k,
            stop_token_ids=tuple(rollout.stop_token_ids),
            n=rollout.val_n_samples if validation else rollout.n_samples_per_prompt,
            seed=seed,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class WeightSegment:
    """Response tokens ``start .. end - 1`` of a sample came from weights ``version`` (one of
    SGLang's ``meta_info.weight_versions`` spans, ``{version, start, end}``)."""

    version: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One generated response."""

    prompt_index: int
    """Index of its prompt in the ``generate`` call."""
    sample_index: int
    """Index among its prompt's ``n`` responses."""
    response_ids: list[int]
    """Generated token ids, ending with the stop token when ``finish_reason == "stop"``."""
    logprobs: list[float]
    """``[len(response_ids)]`` rollout log-probs of the generated tokens (see the module docstring)."""
    finish_reason: Literal["stop", "length", "abort"]
    """``stop``: an EOS or stop token ended it; ``length``: ``max_new_tokens`` (or the context) did;
    ``abort``: a partial sample, stopped by a pause or an abort (only when partials are asked for)."""
    weight_version: str | None
    """The engine's weight version when it generated the sample's last token (``str(version)`` of
    the last update), None when the engine reports none."""
    weight_segments: tuple[WeightSegment, ...]
    """Which weights generated which tokens, oldest first, covering ``response_ids`` without gaps;
    empty when the engine reports no version."""
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False)
    """``[N, num_layers, topk]`` uint8 or int16: the experts the engine's router chose for tokens
    ``[0, N)`` of prompt + response, in every layer (:mod:`megarl.rollout.routed_experts`); for a
    sample generated in one request ``N = len(prompt) + len(response_ids) - 1`` (the last token was
    never fed through the model). None unless the engines were asked for them (routing replay R3).
    Left out of ``==``: arrays do not compare to one truth value."""

    def continued_by(self, continuation: Sample) -> Sample:
        """This partial sample followed by the sample that resumed it (its tokens, log-probs and
        segments shifted past this one's tokens; this one's segments keep their versions).

        The routed experts are the continuation's: it was generated from the prompt followed by
        this sample's tokens, so the engine routed all of them again (under the weights it holds
        now, the ones the continuation's tokens were sampled with) and its array covers the whole
        sample; this one's would cover only its own part. A continuation that has none keeps this
        one's."""
        offset = len(self.response_ids)
        segments = [segment for segment in self.weight_segments if segment.end > segment.start]
        for segment in continuation.weight_segments:
            if segment.end == segment.start and (segments or offset):
                continue  # an empty span (no tokens generated under it) adds nothing
            if segments and segments[-1].version == segment.version:
                segments[-1] = WeightSegment(segment.version, segments[-1].start, segment.end + offset)
            else:
                segments.append(WeightSegment(segment.version, segment.start + offset, segment.end + offset))
        return dataclasses.replace(
            continuation,
            prompt_index=self.prompt_index,
            sample_index=self.sample_index,
            response_ids=self.response_ids + continuation.response_ids,
            logprobs=self.logprobs + continuation.logprobs,
            weight_segments=tuple(segments) or self.weight_segments,
            routed_experts=self.routed_experts if continuation.routed_experts is None else continuation.routed_experts,
        )


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK_64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return value ^ (value >> 31)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample: a hash of the call's seed and the sample's position, in [0, 2**63)."""
    mixed = _splitmix64(seed & _MASK_64)
    mixed = _splitmix64(mixed ^ prompt_index)
    mixed = _splitmix64(mixed ^ sample_index)
    return mixed >> 1


def resume_seed(seed: int, generated: int) -> int:
    """The seed of a partial sample's continuation: a hash of the sample's seed and the number of
    tokens it has already generated, in [0, 2**63)."""
    return _splitmix64(_splitmix64(seed & _MASK_64) ^ generated) >> 1
