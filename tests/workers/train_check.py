"""megarl's training loop with test hooks (torchrun worker for tests/test_train.py).

Runs :func:`megarl.trainer.run.setup` and :func:`megarl.trainer.loop.fit` on a config (``--config``
and overrides), with optional faults injected through ``megarl.trainer.loop.train_step``:

``--stop-before K``   raise before step K (a crash after the checkpoints of the earlier steps);
``--nan-step K``      the policy loss's gradient from the first micro-batch of step K is NaN;
``--kill-engine-after K``  SIGKILL the rollout engine's process after step K;
``--slow-step-s S``   the trainer sleeps S seconds before each step (a slow trainer);
``--check-segments``  keep the policy's weights of every version the run trains at, and at the
                      end recompute the log-probs of the trained samples that several weight
                      versions generated, each segment under its own version;
``--teacher-engine``  with ``algorithm.opd_type: megatron``, also launch the teacher's engine (as
                      ``sglang`` would) and let it score the first step's samples before they
                      are packed, for the Megatron teacher to be compared with.

Rank 0 writes ``--report`` (JSON): the engine's copy of ``--watch`` (one HF weight) before the
first step and after every step, the engine restarts, whether the run completed, the prompts
each step trained on (``trained``: step -> the prompt token ids of its groups) and, with
``--check-segments``, ``segments``: per version, the tokens checked and the largest difference
between the engine's log-probs and the trainer's; with a distillation teacher, ``teacher_sample``:
the first step's last sample's prompt, response and teacher log-probs (the engine's); with a
Megatron teacher, ``megatron_teacher``: over the first step's trained tokens, the largest
difference between its log-probs and the old log-probs and (``--teacher-engine``) the engine
teacher's, and the tokens compared.

The reward workers and Megatron's checkpoint writer are spawned processes, and each runs this
file's top level again before its own work: torch and megarl are imported in :func:`main`, so that
they start in a fraction of a second instead of importing torch, transformers and Megatron.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time


class InjectedStop(RuntimeError):
    """The crash ``--stop-before`` asks for."""


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    parser.add_argument("--config", help="YAML file; omit for the defaults")
    parser.add_argument("--watch", default="model.layers.0.self_attn.o_proj.weight")
    parser.add_argument("--stop-before", type=int)
    parser.add_argument("--nan-step", type=int)
    parser.add_argument("--kill-engine-after", type=int)
    parser.add_argument("--slow-step-s", type=float, default=0.0)
    parser.add_argument("--check-segments", action="store_true")
    parser.add_argument("--teacher-engine", action="store_true")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> None:
    launched_at = time.time()
    import torch

    from concurrent.futures import ThreadPoolExecutor

    from megarl.config import load_config
    from megarl.nodes import Node
    from megarl.trainer import loop
    from megarl.trainer.batch import TrainBatch
    from megarl.trainer.launch import start_teacher
    from megarl.trainer.rollout import add_teacher_log_probs
    from megarl.trainer.run import setup
    from megarl.trainer.staleness import version_number

    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    teacher_engine = None
    if args.teacher_engine and os.environ.get("RANK", "0") == "0":
        # Launched while the ranks build their models, as the engine mode's EarlyStart does.
        teacher_engine = ThreadPoolExecutor(1).submit(start_teacher, config, config.logging.resolved_run_dir(), Node.from_env())
    run = setup(config, launched_at=launched_at)
    first = run.is_first_rank
    if teacher_engine is not None:
        run.teacher = teacher_engine.result()  # closed with the run
    report = {"weights": {}, "completed": False}

    def watch(label: str) -> None:
        if first:
            report["weights"][label] = run.engines.read_weight(args.watch)

    original_step = loop.train_step
    original_loss = run.policy.loss
    original_batch_of = loop.batch_of
    current = {"step": None, "micro_batches": 0}
    report["trained"] = {}
    weights_at: dict[int, dict[str, torch.Tensor]] = {}  # version -> this rank's policy parameters
    partial_samples: list = []

    def parameters():
        return {f"{index}.{name}": parameter for index, chunk in enumerate(run.policy.model.chunks) for name, parameter in chunk.named_parameters()}

    def recording_batch_of(run_, samples, metrics):
        groups = {sample.group: sample.prompt_ids for sample in samples}
        report["trained"][str(current["step"])] = list(groups.values())
        if run_.teacher is not None and run_.teacher_model is not None and current["step"] == run_.start_step:
            add_teacher_log_probs(run_, samples, {})
        if samples[0].teacher_log_probs is not None and "teacher_sample" not in report:
            sample = samples[-1]
            report["teacher_sample"] = {"prompt_ids": sample.prompt_ids, "response_ids": sample.response_ids, "teacher_log_probs": sample.teacher_log_probs}
        if args.check_segments:
            partial_samples.extend(sample for sample in samples if len({segment.version for segment in sample.weight_segments}) > 1)
        return original_batch_of(run_, samples, metrics)

    def loss_with_nan(micro, output):
        loss_sum, count, metrics = original_loss(micro, output)
        if current["step"] == args.nan_step and current["micro_batches"] == 0:
            # NaN in the backward only: the gradients go non-finite, the reported loss does not.
            loss_sum.register_hook(lambda grad: grad * float("nan"))
        current["micro_batches"] += 1
        return loss_sum, count, metrics

    def step_with_faults(run_, step, phase=lambda name: None):
        if step == args.stop_before:
            raise InjectedStop(f"stopped before step {step}")
        current.update(step=step, micro_batches=0)
        if args.check_segments:
            weights_at[run_.weight_version] = {name: parameter.detach().clone() for name, parameter in parameters().items()}
        time.sleep(args.slow_step_s)
        metrics = original_step(run_, step, phase)
        watch(f"after_{step}")
        if first and step == args.kill_engine_after:
            for pid in run.engines.pids().values():
                os.kill(pid, signal.SIGKILL)
        return metrics

    def check_segments() -> dict[str, dict[str, float]]:
        """Each segment of the multi-version samples against the trainer's log-probs under its
        version (collective: the first rank, which packs the batches, recorded the samples and
        hands them to every rank)."""
        shared = [partial_samples if first else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        partial_samples[:] = shared[0]
        if not partial_samples:
            return {}
        now = {name: parameter.detach().clone() for name, parameter in parameters().items()}
        # The same number of samples on every data-parallel rank: the last one repeated (checked
        # once), so that a single multi-version sample is checked too rather than dropped.
        dp_size = run.pg_collection.dp.size()
        filled = partial_samples + partial_samples[-1:] * (-len(partial_samples) % dp_size)
        batch = TrainBatch.from_scored(filled, pad_token_id=run.tokenizer.pad_token_id, pad_multiple=run.pad_multiple)
        found: dict[str, dict[str, float]] = {}
        for version, weights in sorted(weights_at.items()):
            with torch.no_grad():
                for name, parameter in parameters().items():
                    parameter.copy_(weights[name])
            log_probs, _ = run.policy.log_probs(batch)
            for row, sample in enumerate(partial_samples):
                start = len(sample.prompt_ids) - 1
                for segment in sample.weight_segments:
                    if version_number(segment.version) != version:
                        continue
                    trainer = log_probs[row, start + segment.start : start + segment.end]
                    engine = torch.tensor(sample.rollout_log_probs[segment.start : segment.end])
                    entry = found.setdefault(str(version), {"tokens": 0, "max_diff": 0.0})
                    entry["tokens"] += segment.end - segment.start
                    entry["max_diff"] = max(entry["max_diff"], (trainer - engine).abs().max().item())
        with torch.no_grad():
            for name, parameter in parameters().items():
                parameter.copy_(now[name])
        return found

    def compared_teacher_log_probs(batch):
        """The Megatron teacher's log-probs; on the first step, compared with the old log-probs and
        the engine teacher's that the batch holds then (``--teacher-engine``)."""
        values = original_teacher_log_probs(batch)
        if current["step"] == run.start_step and "megatron_teacher" not in report:
            mask = batch.response_mask
            compared = {"tokens": int(mask.sum()), "old_diff": float((values - batch.token_values["old_log_probs"])[mask].abs().max())}
            if "teacher_log_probs" in batch.token_values:
                compared["engine_diff"] = float((values - batch.token_values["teacher_log_probs"])[mask].abs().max())
            report["megatron_teacher"] = compared
        return values

    if run.teacher_model is not None:
        original_teacher_log_probs = run.teacher_model.log_probs
        run.teacher_model.log_probs = compared_teacher_log_probs
    run.policy.loss = loss_with_nan
    loop.train_step = step_with_faults
    loop.batch_of = recording_batch_of
    watch("initial")
    try:
        try:
            loop.fit(run)
            report["completed"] = True
        except InjectedStop:
            pass
        if args.check_segments:
            report["segments"] = check_segments()
    finally:
        if first:
            report["engine_restarts"] = run.engines.restarts
            report["run_dir"] = str(run.run_dir)
            report["steps"] = run.config.train.steps
            report["prompts"] = {
                "files": [prompt.file_index for prompt in run.train_set.prompts],
                "truncated": run.train_set.num_truncated,
                "lengths": [len(prompt.prompt_ids) for prompt in run.train_set.prompts],
                "ids": [prompt.prompt_ids for prompt in run.train_set.prompts],
            }
            with open(args.report, "w") as handle:
                json.dump(report, handle)
        run.close()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
