"""Batched generation with a KV cache on a transformers causal LM, for the ``hf`` engine.

Prompts of different lengths are left-padded into one batch; the requests of one prompt (its n
samples) share one prefill, whose cache rows are then repeated for each. Each row gets explicit position ids
(``0 .. len-1`` from its first real token) and an attention mask that hides the padding, so a
row's logits do not depend on which other prompts share its batch (up to float rounding in
batched matrix products, ~1e-7 in fp32). Every step runs the model on the last token of every
row with the cache, keeping only the last position's logits.

Per-token log-probs follow :mod:`megarl.rollout.sampling` (SGLang's semantics), in fp32:
``log_softmax(logits / temperature)`` at the drawn token when sampling, ``log_softmax(logits)`` at
the argmax when greedy. top-p and top-k restrict the draw only. A seeded row draws from its own
``torch.Generator``, so its tokens depend on its seed alone; an unseeded row draws from the
engine's generator.

Between two decoding steps the caller's ``on_step`` sees the batch (:class:`Decoding`): it may
finish rows early (an abort), block (a pause: the weights may change meanwhile), or drop the KV
cache, which the next step then recomputes over every token so far (SGLang's retract).

:meth:`BatchGenerator.prompt_logprobs` scores sequences instead of extending them (a distillation
teacher's ``input_token_logprobs``): one right-padded forward, ``log_softmax`` of the raw logits
gathered at each next token.

With a :class:`~megarl.rollout.embedded.routing.RouterRecorder` every forward's routed experts are
filed per token (:class:`~megarl.rollout.embedded.routing.BatchRoutes`), and a row's are copied
into its :class:`Result` when it finishes: those of the forwards that computed its tokens (after a
dropped cache, the recomputation's).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from transformers import DynamicCache

from megarl.rollout.embedded.routing import BatchRoutes, RouterRecorder


SCORED_LOGITS = 1 << 26
"""Prompt scoring computes at most this many logits in one forward (256 MiB in fp32)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One sample to generate."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    """-1 (or >= vocabulary) is off."""
    stop_token_ids: frozenset[int]
    """EOS tokens and the request's stop tokens."""
    seed: int | None


@dataclasses.dataclass(slots=True)
class Result:
    """One generated sample, as SGLang reports it."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: dict
    """``{"type": "stop", "matched": token}``, ``{"type": "length", "length": n}``, or what
    :meth:`Decoding.finish` was given (an abort); empty while the row generates."""
    routed_experts: torch.Tensor | None = None
    """``[len(input_ids) + len(output_ids) - 1, num_layers, topk]`` int32, set when the row finishes
    on a generator with a router recorder; None otherwise."""


class Decoding:
    """A batch between two decoding steps, as :meth:`BatchGenerator.generate`'s ``on_step`` sees it.

    Args:
        results: one per request, in batch order; each grows by one token per step until finished.
        routes: the batch's routed experts, copied into a row's result when it finishes; None: not recorded.
    """

    def __init__(self, results: list[Result], routes: BatchRoutes | None = None):
        self.results = results
        self.routes = routes
        self.steps = 0
        """Steps done: every unfinished row holds this many tokens."""
        self.cache_dropped = False

    def unfinished(self) -> list[int]:
        """Rows still generating."""
        return [row for row, result in enumerate(self.results) if not result.finish_reason]

    def finish(self, row: int, finish_reason: dict) -> None:
        """Stop ``row`` now with ``finish_reason``, keeping its tokens so far (no-op if it finished)."""
        result = self.results[row]
        if not result.finish_reason:
            result.finish_reason = finish_reason
            if self.routes is not None:
                result.routed_experts = self.routes.of_row(row, len(result.output_ids))

    def drop_cache(self) -> None:
        """Forget the KV cache: the next step recomputes it over the prompts and every token so far,
        with the weights the model holds then."""
        self.cache_dropped = True


def _sampling_probs(scaled_logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """``[batch, vocab]`` probabilities to draw from: softmax, then top-k, then top-p over what top-k kept.

    Args:
        scaled_logits: ``[batch, vocab]`` logits divided by the temperature.
        top_p: ``[batch]`` nucleus thresholds (1: off).
        top_k: ``[batch]`` kept tokens (the vocabulary size: off).

    The result is not renormalised: drawing with an exponential race needs only proportions.
    """
    probs = torch.softmax(scaled_logits, dim=-1)
    if bool((top_p >= 1).all()) and bool((top_k >= probs.shape[-1]).all()):
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    kept = torch.where(rank[None, :] < top_k[:, None], sorted_probs, torch.zeros_like(sorted_probs))
    before = torch.cumsum(kept, dim=-1) - kept
    kept = torch.where(before < top_p[:, None] * kept.sum(dim=-1, keepdim=True), kept, torch.zeros_like(kept))
    return torch.zeros_like(probs).scatter_(1, order, kept)


class BatchGenerator:
    """Generates batches of :class:`Request` on one model.

    Args:
        model: a transformers causal LM in eval mode.
        context_length: the model's maximum sequence length; responses stop there.
        pad_token_id: filler of the left padding (never attended to).
        random_seed: seed of the generator that unseeded requests draw from.
        recorder: records the routed experts of every token (the results carry them); None: not recorded.
    """

    def __init__(self, model: torch.nn.Module, context_length: int, pad_token_id: int, random_seed: int, recorder: RouterRecorder | None = None):
        self.model = model
        self.recorder = recorder
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator().manual_seed(random_seed)

    def check(self, requests: list[Request]) -> None:
        """Raise ValueError if a prompt is empty or leaves no room in the context."""
        for index, request in enumerate(requests):
            if not request.input_ids or len(request.input_ids) >= self.context_length:
                raise ValueError(
                    f"request {index}: prompt of {len(request.input_ids)} tokens; it must hold 1 to "
                    f"{self.context_length - 1} tokens (the model's context is {self.context_length})"
                )

    @torch.inference_mode()
    def prompt_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """The log-prob of each sequence's tokens after position ``start`` given the tokens before
        them, ``log_softmax(logits[t - 1])[token_t]`` for ``t`` in ``start + 1 .. len - 1``, in fp32
        from the raw logits (SGLang's ``input_token_logprobs``: no temperature). The sequences go
        right-padded through one forward per group of rows (at most :data:`SCORED_LOGITS` logits
        at once), each row at positions ``0 .. len - 1`` and its padding masked.

        Raises:
            ValueError: an empty sequence, one longer than the context, or a start outside it.
        """
        for index, (sequence, start) in enumerate(zip(sequences, starts)):
            if not 0 < len(sequence) <= self.context_length or not 0 <= start < len(sequence):
                raise ValueError(
                    f"item {index}: {len(sequence)} tokens from logprob_start_len {start}; it needs 1 to {self.context_length} tokens "
                    f"(the model's context) and 0 <= logprob_start_len < its length"
                )
        device = next(self.model.parameters()).device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        rows_per_forward = max(1, SCORED_LOGITS // (vocab * max(len(sequence) for sequence in sequences)))
        values = []
        for first in range(0, len(sequences), rows_per_forward):
            group = sequences[first : first + rows_per_forward]
            width = max(len(sequence) for sequence in group)
            input_ids = torch.full((len(group), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, sequence in enumerate(group):
                input_ids[row, : len(sequence)] = torch.tensor(sequence)
                attention_mask[row, : len(sequence)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            positions = torch.arange(width, device=device).expand(len(group), -1)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0].cpu()
            values += [logprobs[row, start : len(sequence) - 1].tolist() for row, (sequence, start) in enumerate(zip(group, starts[first:]))]
        return values

    @torch.inference_mode()
    def generate(self, requests: list[Request], on_step: Callable[[Decoding], None] = lambda decoding: None) -> list[Result]:
        """Generate every request in one batch.

        Args:
            requests: the samples; prompts may differ in length and sampling parameters.
            on_step: called after every decoding step, once each unfinished row holds one more
                token (the server's liveness signal, pause and abort point).

        Raises:
            ValueError: a prompt is empty or leaves no room in the context.
        """
        if not requests:
            return []
        self.check(requests)
        batch = len(requests)
        device = next(self.model.parameters()).device
        # The requests of one prompt (its n samples) share one prefill, as SGLang's prefix cache
        # shares it: the model reads each distinct prompt once, and its cache rows and last logits
        # then stand for every request of that prompt.
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of = [distinct.setdefault(tuple(request.input_ids), len(distinct)) for request in requests]
        width = max(len(prompt) for prompt in distinct)
        input_ids = torch.full((len(distinct), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(distinct), width, dtype=torch.long)
        for row, prompt in enumerate(distinct):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        limits = [min(request.max_new_tokens, self.context_length - len(request.input_ids)) for request in requests]
        generators = [None if request.seed is None else torch.Generator().manual_seed(request.seed) for request in requests]
        temperatures = torch.tensor([request.temperature if request.temperature > 0 else 1.0 for request in requests], device=device)
        results = [Result(output_ids=[], logprobs=[], finish_reason={}) for _ in requests]
        routes = None if self.recorder is None else BatchRoutes(self.recorder, [len(request.input_ids) for request in requests], width, max(limits))
        decoding = Decoding(results, routes)
        active = list(range(batch))

        cache = DynamicCache(config=self.model.config)
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        if routes is not None:
            routes.prefilled(prompt_of, len(distinct))
        if len(distinct) < batch:
            rows = torch.tensor(prompt_of, device=device)
            cache.reorder_cache(rows)
            output.logits = output.logits[rows]
            input_ids, attention_mask, position_ids = input_ids[rows], attention_mask[rows], position_ids[rows]
        token_columns = [input_ids]  # every token fed so far, for a recomputed cache
        vocab = output.logits.shape[-1]
        top_p = torch.tensor([request.top_p for request in requests], device=device)
        top_k = torch.tensor([request.top_k if 0 < request.top_k < vocab else vocab for request in requests], device=device)
        greedy = torch.tensor([request.temperature == 0 for request in requests], device=device)
        positions = position_ids[:, -1]
        for step in range(max(limits)):
            logits = output.logits[:, -1, :].float()  # [batch, vocab]
            scaled = logits / temperatures[:, None]
            next_tokens = torch.argmax(logits, dim=-1)
            sampling = [row for row in active if requests[row].temperature > 0]
            if sampling:
                # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each row's E comes
                # from its own generator, so its tokens depend on its seed alone.
                noise = torch.ones(batch, vocab)
                for row in sampling:
                    noise[row].exponential_(generator=generators[row] or self.generator)
                drawn = torch.argmax(_sampling_probs(scaled, top_p, top_k) / noise.to(device), dim=-1)
                next_tokens = torch.where(greedy, next_tokens, drawn)
            logprobs = torch.log_softmax(scaled, dim=-1).gather(1, next_tokens[:, None])[:, 0]
            tokens, token_logprobs = next_tokens.tolist(), logprobs.tolist()
            for row in active:
                result = results[row]
                result.output_ids.append(tokens[row])
                result.logprobs.append(token_logprobs[row])
                if tokens[row] in requests[row].stop_token_ids:
                    decoding.finish(row, {"type": "stop", "matched": tokens[row]})
                elif len(result.output_ids) == limits[row]:
                    decoding.finish(row, {"type": "length", "length": limits[row]})
            decoding.steps = step + 1
            on_step(decoding)
            active = [row for row in active if not results[row].finish_reason]
            if not active:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            positions = positions + 1
            token_columns.append(next_tokens[:, None])
            if decoding.cache_dropped:
                decoding.cache_dropped = False
                cache = DynamicCache(config=self.model.config)
                output = self.model(
                    input_ids=torch.cat(token_columns, dim=1), attention_mask=attention_mask,
                    position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, logits_to_keep=1,
                )
                if routes is not None:
                    routes.fed(0, attention_mask.shape[1])
                continue
            output = self.model(
                input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
            if routes is not None:
                routes.fed(width + step, 1)
        return results
