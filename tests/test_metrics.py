"""The metric sinks: metrics.jsonl always, the console line, TensorBoard and W&B offline."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from megarl.config import load_config
from megarl.metrics import MetricsFileError, MetricsLogger, console_line, read_rows

pytestmark = pytest.mark.cpu

METRICS = {"reward/mean": torch.tensor(0.5), "policy/loss": -0.25, "policy/grad_norm": float("nan"), "time/step_s": 1.5}


def test_every_step_is_a_json_line_and_the_console_shows_the_main_metrics(tmp_path, capsys):
    logger = MetricsLogger(load_config(None, ["logging.log_every=2"]).logging, tmp_path, enabled=True)
    logger.log(0, METRICS)
    logger.log(1, {**METRICS, "reward/mean": 0.75})
    logger.close()
    lines = [json.loads(line, parse_constant=reject_constant) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert lines[1]["reward/mean"] == 0.75 and lines[0]["policy/loss"] == -0.25
    assert lines[0]["policy/grad_norm"] == "NaN" and math.isnan(float(lines[0]["policy/grad_norm"]))
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["step 0 | reward 0.500 | loss -0.2500 | s/step 1.5"]


def reject_constant(constant):
    raise AssertionError(f"metrics.jsonl must be strict JSON; found a bare {constant}")


def test_non_finite_values_are_strict_json_strings_that_float_reads(tmp_path):
    logger = MetricsLogger(load_config(None, ["logging.console=false"]).logging, tmp_path, enabled=True)
    logger.log(0, {"a": float("inf"), "b": float("-inf"), "c": torch.tensor(float("nan")), "d": 2})
    logger.close()
    (row,) = [json.loads(line, parse_constant=reject_constant) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {name: row[name] for name in "abcd"} == {"a": "Infinity", "b": "-Infinity", "c": "NaN", "d": 2.0}
    assert [float(row[name]) for name in "ab"] == [math.inf, -math.inf] and math.isnan(float(row["c"]))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(load_config(None).logging, tmp_path / "run", enabled=False)
    logger.log(0, METRICS)
    logger.close()
    assert not (tmp_path / "run").exists()


def both_sinks(tmp_path, monkeypatch) -> MetricsLogger:
    """A logger with TensorBoard and offline W&B on, writing under ``tmp_path``."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline", "logging.console=false"])
    return MetricsLogger(config.logging, tmp_path, enabled=True, run_settings=config.to_dict())


def test_tensorboard_and_offline_wandb_write_under_the_run_directory(tmp_path, monkeypatch):
    logger = both_sinks(tmp_path, monkeypatch)
    logger.log(3, METRICS)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_console_line_skips_missing_and_nan_metrics():
    assert console_line(7, {"reward/mean": 0.125, "policy/grad_norm": float("nan")}) == "step 7 | reward 0.125"


def test_console_line_ends_with_samples_per_second_and_the_step_split_into_its_phases():
    values = {
        "reward/mean": 0.5, "throughput/samples_per_s": 411.7, "time/step_s": 0.314, "time/rollout_s": 0.121,
        "time/forward_s": 0.049, "time/update_s": 0.118, "weights/sync_s": 0.012,
    }
    assert console_line(3, values) == "step 3 | reward 0.500 | 412 samples/s | s/step 0.31 (rollout 0.12, forward 0.05, update 0.12, sync 0.01)"
    # A phase that is absent is left out; a step over a second keeps one decimal.
    assert console_line(3, {"time/step_s": 12.25, "time/rollout_s": 11.5, "time/update_s": 0.75}) == "step 3 | s/step 12.2 (rollout 11.5, update 0.75)"


def test_console_metrics_asked_for_follow_the_main_ones(tmp_path, capsys):
    logger = MetricsLogger(load_config(None, ["logging.console_metrics=[reward/length, reward/absent]"]).logging, tmp_path, enabled=True)
    logger.log(0, {**METRICS, "reward/length": 3.14159})
    logger.close()
    assert capsys.readouterr().out.splitlines() == ["step 0 | reward 0.500 | loss -0.2500 | s/step 1.5 | reward/length 3.142"]


def test_a_resumed_run_replaces_the_rows_logged_after_its_checkpoint(tmp_path):
    config = load_config(None, ["logging.console=false"])
    crashed = MetricsLogger(config.logging, tmp_path, enabled=True)
    for step in range(5):
        crashed.log(step, {"reward/mean": float(step)})
    crashed.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "rew')  # torn by the crash
    resumed = MetricsLogger(config.logging, tmp_path, enabled=True)
    resumed.start(3)  # the checkpoint was after step 2
    resumed.log(3, {"reward/mean": 30.0})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["reward/mean"]) for row in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    (original,) = tmp_path.glob("metrics.jsonl.replaced-*")
    assert original.read_text().count("\n") == 5  # nothing lost: the crashed run's rows are kept aside


def test_a_resumed_run_purges_tensorboard_and_resumes_the_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline", "logging.console=false"])
    first = MetricsLogger(config.logging, tmp_path, enabled=True, run_settings=config.to_dict())
    for step in range(4):
        first.log(step, {"reward/mean": float(step)})
    first.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    resumed = MetricsLogger(config.logging, tmp_path, enabled=True, run_settings=config.to_dict())
    resumed.start(2)
    resumed.log(2, {"reward/mean": 20.0})
    resumed.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    # offline-run-<date>_<time>-<id>[-<n> when two start in the same second]
    run_ids = {re.match(r"offline-run-\d{8}_\d{6}-(\w+)", path.name).group(1) for path in (tmp_path / "wandb").glob("offline-run-*")}
    assert run_ids == {run_id}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("reward/mean")] == [(0, 0.0), (1, 1.0), (2, 20.0)]


def test_read_rows_gives_back_what_the_logger_wrote_as_floats(tmp_path):
    logger = MetricsLogger(load_config(None, ["logging.console=false"]).logging, tmp_path, enabled=True)
    logger.log(0, {"reward/mean": 0.5, "policy/grad_norm": float("nan")})
    logger.log(1, {"reward/mean": float("inf")})
    logger.close()
    # A row still being written (no newline yet) is left out.
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 2, "rew')
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [(row["step"], row["reward/mean"]) for row in rows] == [(0.0, 0.5), (1.0, math.inf)]
    assert math.isnan(rows[0]["policy/grad_norm"]) and isinstance(rows[0]["time"], float)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read (No such file or directory)"),
        ("", "no rows (the run logged no step)"),
        ('{"step": 0}\nnot json\n{"step": 1}\n', ":2: not valid JSON (Expecting value)"),
        ('[1, 2]\n', ':1: not a metrics row (a JSON object with a "step")'),
        ('{"step": 0, "note": "fast"}\n', ":1: 'note' is not a number ('fast')"),
        (b"\x89PNG\r\n\x1a\n\xff", "not a metrics.jsonl (not text)"),
    ],
)
def test_read_rows_names_the_file_and_line_of_a_bad_metrics_file(tmp_path, content, problem):
    path = tmp_path / "metrics.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MetricsFileError) as raised:
        read_rows(path)
    assert str(raised.value) == f"{path}{'' if problem.startswith(':') else ': '}{problem}"


def test_a_few_generations_go_to_tensorboard_and_wandb_as_a_table(tmp_path, monkeypatch):
    logger = both_sinks(tmp_path, monkeypatch)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [
        {"step": 2, "prompt": "max 1 | 2", "response": "2\nok", "score": 1.0, "reward_extras": {"length": 1.0}},
        {"step": 2, "prompt": "min 3 4", "response": "4", "score": 0.0, "reward_extras": {}},
    ]
    logger.log_table(2, "generations/rollout", rows)
    logger.log(2, METRICS)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (event,) = events.Tensors("generations/rollout/text_summary")
    assert event.step == 2
    assert event.tensor_proto.string_val[0].decode().splitlines() == [
        "| step | prompt | response | score | reward_extras |",
        "| --- | --- | --- | --- | --- |",
        '| 2 | max 1 \\| 2 | 2<br>ok | 1.0 | {"length": 1.0} |',
        "| 2 | min 3 4 | 4 | 0.0 | {} |",
    ]
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/generations/rollout_*.table.json")
    saved = json.loads(table.read_text())
    assert saved["columns"] == list(rows[0]) and saved["data"][1] == [2, "min 3 4", "4", 0.0, "{}"]
