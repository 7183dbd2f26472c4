"""Validation: every validation prompt answered ``rollout.val_n_samples`` times with validation's
own sampling (``rollout.val_temperature``, ``val_top_p``, ``val_top_k``; greedy by default),
scored by the run's reward, and summarised overall and per data source.

Metrics (:func:`validation_metrics`), with ``S`` a source (:func:`~megarl.trainer.generations.data_source`:
the row's ``data_source`` field, else its file's name without the extension)::

    val/accuracy, val/S/accuracy      mean score over every sample (verl's mean@n)
    val/pass@k,   val/S/pass@k        with n > 1 samples per prompt, for k = 1, 2, 4, ... and n

pass@k is the chance that at least one of k samples drawn without replacement from a prompt's n is
correct, estimated without bias from the prompt's c correct samples (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", eq. 1), then averaged over the prompts::

    pass@k = 1 - C(n - c, k) / C(n, k)

A sample is correct when its score is at least ``train.val_pass_threshold``. Departures from verl
(``process_validation_metrics``), all deliberate: verl reports mean@n, best@k and worst@k with
bootstrap estimates and maj@k over every numeric reward extra; megarl reports the mean score and
the exact pass@k of the score only, and keeps verl's ``val-core/<source>/reward/mean@n`` names
out (``val/accuracy`` is what the console, the run summary and the tools read).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from megarl.rollout.sampling import SamplingParams
from megarl.trainer.generations import SHOWN, data_source, validation_record, write_generations
from megarl.trainer.rollout import play_and_score, sampling_seed, score_samples

if TYPE_CHECKING:
    from megarl.trainer.run import Run


class ValidationScore(NamedTuple):
    """One validation sample as the metrics see it."""

    source: str
    """Its prompt's data source."""
    prompt: int
    """Its prompt's position in the validation set."""
    score: float


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``correct`` are correct:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021), exactly, in integers until the division.

    Raises:
        ValueError: unless ``0 <= correct <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n; got n={n}, correct={correct}, k={k}")
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k that validation reports pass@k for with ``n`` samples a prompt: the powers of 2 below
    ``n``, and ``n`` (none for ``n == 1``, whose pass@1 is the accuracy of a thresholded score)."""
    if n < 2:
        return []
    return [2**power for power in range(n.bit_length()) if 2**power < n] + [n]


def validation_metrics(scores: Sequence[ValidationScore], threshold: float) -> dict[str, float]:
    """``val/accuracy`` and ``val/<source>/accuracy`` (mean score), and with several samples a
    prompt ``val/pass@k`` and ``val/<source>/pass@k`` (the mean over prompts of :func:`pass_at_k`,
    a sample correct when its score is at least ``threshold``).

    The k reported are :func:`pass_ks` of the fewest samples any prompt has (every prompt has
    ``rollout.val_n_samples``)."""
    by_prompt: dict[int, list[float]] = defaultdict(list)
    source_of: dict[int, str] = {}
    for sample in scores:
        by_prompt[sample.prompt].append(sample.score)
        source_of[sample.prompt] = sample.source
    metrics = {"val/accuracy": sum(sample.score for sample in scores) / len(scores)}
    for source in sorted(set(source_of.values())):
        picked = [sample.score for sample in scores if sample.source == source]
        metrics[f"val/{source}/accuracy"] = sum(picked) / len(picked)
    ks = pass_ks(min(len(values) for values in by_prompt.values()))
    for k in ks:
        per_prompt = {prompt: pass_at_k(len(values), sum(value >= threshold for value in values), k) for prompt, values in by_prompt.items()}
        metrics[f"val/pass@{k}"] = sum(per_prompt.values()) / len(per_prompt)
        for source in sorted(set(source_of.values())):
            picked = [value for prompt, value in per_prompt.items() if source_of[prompt] == source]
            metrics[f"val/{source}/pass@{k}"] = sum(picked) / len(picked)
    return metrics


def validate(run: Run, step: int, *, logged_at: int) -> dict[str, float]:
    """Validate the policy after step ``step`` (``-1``: the initial one; first rank): its
    :func:`validation_metrics`. With ``logging.validation_dir`` the samples also go to
    ``<validation_dir>/<step>.jsonl`` and the first few to TensorBoard / W&B as the table
    ``generations/validation`` of metrics row ``logged_at``."""
    config = run.config
    sampling = SamplingParams.from_config(
        config.rollout, max_new_tokens=config.data.max_response_length, seed=sampling_seed(config.rollout.seed, step, -1), validation=True
    )
    files, batch_size = config.data.val_files, config.rollout.batch_size
    records = []
    for index, prompts in enumerate(run.val_set.batches(batch_size)):
        label = f"validation {step} batch {index}"
        if run.plays_episodes:
            scored, _ = play_and_score(run, prompts, sampling, first_group=index * batch_size, label=label)
        else:
            samples = run.engines.generate([prompt.prompt_ids for prompt in prompts], sampling)
            scored, _ = score_samples(run, prompts, samples, first_group=index * batch_size, label=label)
        records += scored
    scores = [ValidationScore(data_source(record.text.prompt, files), record.group, record.score) for record in records]
    directory = config.logging.generations_dir(config.logging.validation_dir)
    if directory is not None:
        seen: dict[int, int] = defaultdict(int)
        saved = []
        for record in sorted(records, key=lambda record: record.group):
            saved.append(validation_record(step, record.group, seen[record.group], record.text, record.score, files))
            seen[record.group] += 1
        write_generations(directory, step, saved)
        run.logger.log_table(logged_at, "generations/validation", saved[:SHOWN])
    return validation_metrics(scores, config.train.val_pass_threshold)
