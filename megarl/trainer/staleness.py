"""How old the weights that generated a trained sample are: its staleness.

The trainer's weight version is the version it last pushed to the engines
(:meth:`megarl.trainer.run.Run.sync_weights`: ``step + 1`` after step ``step``; 0 for the weights
the engines launched with, which are the initial policy). Every sample records which weights
generated which of its tokens (:attr:`ScoredSample.weight_segments`, from the engines'
``weight_versions``). Its staleness is the trainer's version when it is trained on minus the
version of its *oldest* token: 0 is on-policy, ``k`` means ``k`` updates happened since its first
token was drawn. Synchronous training (generate, train, push) trains every sample at staleness 0.

Engines report versions as strings: ``str(version)`` of the update that loaded the weights, or a
label that is not an integer (SGLang's and the ``hf`` engine's ``"default"``) for the weights they
launched with, counted as version 0; so is a sample whose engine reported no version.

Metrics of a trained batch (:func:`staleness_metrics`), logged every step:
``rollout/staleness_mean``, ``rollout/staleness_max`` and the histogram as counts
``rollout/staleness_<k>``, one key for every ``k`` from 0 to the step's maximum (zeros
included), so the keys of a step say its range and the counts add up to the batch size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from megarl.trainer.batch import ScoredSample


def version_number(label: str | None) -> int:
    """The trainer version of an engine's weight-version label (see the module docstring)."""
    if label is None or not label.strip().isdigit():
        return 0
    return int(label)


def oldest_version(sample: ScoredSample) -> int:
    """The version that generated the sample's first token (its oldest weights)."""
    if sample.weight_segments:
        return min(version_number(segment.version) for segment in sample.weight_segments)
    return version_number(sample.weight_version)


def newest_version_mask(sample: ScoredSample) -> list[bool]:
    """Per response token, whether the weights of the sample's last token generated it: the
    tokens ``rollout.mask_offpolicy_in_partial_rollout`` trains on."""
    if not sample.weight_segments:
        return [True] * len(sample.response_ids)
    newest = max(version_number(segment.version) for segment in sample.weight_segments)
    mask = [False] * len(sample.response_ids)
    for segment in sample.weight_segments:
        if version_number(segment.version) == newest:
            mask[segment.start : segment.end] = [True] * (segment.end - segment.start)
    return mask


def staleness_metrics(samples: Sequence[ScoredSample], trainer_version: int) -> dict[str, float]:
    """``rollout/staleness_mean``, ``rollout/staleness_max`` and ``rollout/staleness_<k>`` counts
    of the samples trained at ``trainer_version``."""
    ages = [trainer_version - oldest_version(sample) for sample in samples]
    counts = Counter(ages)
    oldest = max(ages)
    return {
        "rollout/staleness_mean": sum(ages) / len(ages),
        "rollout/staleness_max": oldest,
        **{f"rollout/staleness_{age}": counts[age] for age in range(oldest + 1)},
    }
