"""The generation files: what the model wrote, one JSON object per sample, one file per step.

``logging.rollout_dir`` gets ``<step>.jsonl`` with the samples step ``step`` trained on (after
dynamic sampling's filter; in ``rollout.mode: async`` the samples the step took from the buffer),
written once their advantages are known; ``logging.validation_dir`` gets ``<step>.jsonl`` with
every sample of the validation of the policy after step ``step`` (``-1.jsonl``: the initial
policy, ``train.val_before_train`` of a new run). A relative directory is under the run
directory. One object per line::

    {"step": 3, "group": 0, "data_source": "gsm8k", "prompt": "...", "response": "...",
     "score": 1.0, "advantage": 0.87, "truncated": false, "reward_extras": {"format": 1.0}}
    {"step": 3, "index": 12, "sample": 1, "data_source": "gsm8k", "prompt": "...",
     "response": "...", "score": 0.0, "reward_extras": {}}                       # validation

``advantage`` is the sequence's: that of its first response token (an outcome estimator gives
every token of a response the same one); ``index`` is the prompt's position in the validation
set and ``sample`` its sample's among the prompt's ``rollout.val_n_samples``. The first rank
writes each file whole under a temporary name and renames it, so a reader never sees a torn file
(a step run again after a resume replaces its file). With TensorBoard or W&B on, the first
:data:`SHOWN` samples of each file also go there as a table
(:meth:`megarl.metrics.MetricsLogger.log_table`).

verl writes ``{global_step}.jsonl`` with ``input``, ``output``, ``score`` and the reward's extras
at the top level (``_dump_generations``); megarl names the fields as above, keeps the extras in
their own object (a row field cannot shadow them) and counts steps from 0, as ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megarl.data.datasets import Prompt
from megarl.metrics import json_number
from megarl.trainer.batch import SampleText, TrainBatch

SHOWN = 4
"""Samples of each generation file shown as a table on TensorBoard and W&B."""


def data_source(prompt: Prompt, files: Sequence[str]) -> str:
    """Where a prompt comes from, as validation reports it: the row's ``data_source`` field (verl's
    datasets have one), else the name of its file (``files``: its split's, ``data.val_files`` or
    ``data.train_files``) without the extension (``bundled:toy/val.jsonl`` -> ``val``)."""
    source = prompt.metadata.get("data_source")
    if source is not None and source != "":
        return str(source)
    return Path(files[prompt.file_index]).stem


def _extras(extras: dict[str, float]) -> dict[str, float | str]:
    return {name: json_number(value) for name, value in extras.items()}


def rollout_records(step: int, texts: Sequence[SampleText], scores: torch.Tensor, batch: TrainBatch, files: Sequence[str]) -> list[dict[str, Any]]:
    """One record per trained sample (row ``i`` of ``batch`` is ``texts[i]``), once
    :func:`~megarl.trainer.experience.prepare_update` filled the advantages.

    Args:
        scores: ``[B]`` the raw rewards (before shaping).
        files: ``data.train_files``, for :func:`data_source`.
    """
    prompt_lengths = (batch.sequence_lengths - batch.response_lengths).tolist()
    # Label space: column len(prompt) - 1 holds the first response token's advantage.
    advantages = batch.token_values["advantages"][torch.arange(batch.size), torch.tensor(prompt_lengths) - 1].tolist()
    return [
        {
            "step": step,
            "group": group,
            "data_source": data_source(text.prompt, files),
            "prompt": text.prompt.text,
            "response": text.response,
            "score": json_number(score),
            "advantage": json_number(advantage),
            "truncated": truncated,
            "reward_extras": _extras(text.reward_extras),
        }
        for text, score, advantage, group, truncated in zip(texts, scores.tolist(), advantages, batch.group_ids.tolist(), batch.truncated.tolist())
    ]


def validation_record(step: int, index: int, sample: int, text: SampleText, score: float, files: Sequence[str]) -> dict[str, Any]:
    """The record of validation sample ``sample`` of prompt ``index`` (its position in the
    validation set; ``files``: ``data.val_files``)."""
    return {
        "step": step,
        "index": index,
        "sample": sample,
        "data_source": data_source(text.prompt, files),
        "prompt": text.prompt.text,
        "response": text.response,
        "score": json_number(score),
        "reward_extras": _extras(text.reward_extras),
    }


def write_generations(directory: Path, step: int, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as ``<directory>/<step>.jsonl``, one strict-JSON object a line: whole, under
    a temporary name first, then renamed over any older file of the step (a write that fails
    leaves that file as it was, and no temporary one).

    Returns:
        The file's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{step}.jsonl"
    temporary = directory / f".{step}.jsonl.tmp"
    try:
        with temporary.open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
