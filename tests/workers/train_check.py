"""megarl's training loop with test hooks (torchrun worker for tests/test_train.py).

Runs :func:`megarl.trainer.run.setup` and :func:`megarl.trainer.loop.fit` on a config (``--config``
and overrides), with optional faults injected through ``megarl.trainer.loop.train_step``:

``--stop-before K``   raise before step K (a crash after the checkpoints of the earlier steps);
``--nan-step K``      the policy loss's gradient from the first micro-batch of step K is NaN;
``--kill-engine-after K``  SIGKILL the rollout engine's process after step K.

Rank 0 writes ``--report`` (JSON): the engine's copy of ``--watch`` (one HF weight) before the
first step and after every step, the engine restarts, and whether the run completed.

The reward workers and Megatron's checkpoint writer are spawned processes, and each runs this
file's top level again before its own work: torch and megarl are imported in :func:`main`, so that
they start in a fraction of a second instead of importing torch, transformers and Megatron.
"""

from __future__ import annotations

import argparse
import json
import os
import signal


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
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> None:
    import torch

    from megarl.config import load_config
    from megarl.trainer import loop
    from megarl.trainer.run import setup

    args = parse_args(argv)
    run = setup(load_config(args.config, args.overrides))
    first = run.is_first_rank
    report = {"weights": {}, "completed": False}

    def watch(label: str) -> None:
        if first:
            report["weights"][label] = run.engines.read_weight(args.watch)

    original_step = loop.train_step
    original_loss = run.policy.loss
    current = {"step": None, "micro_batches": 0}

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
        metrics = original_step(run_, step, phase)
        watch(f"after_{step}")
        if first and step == args.kill_engine_after:
            for pid in run.engines.pids().values():
                os.kill(pid, signal.SIGKILL)
        return metrics

    run.policy.loss = loss_with_nan
    loop.train_step = step_with_faults
    watch("initial")
    try:
        loop.fit(run)
        report["completed"] = True
    except InjectedStop:
        pass
    finally:
        if first:
            report["engine_restarts"] = run.engines.restarts
            report["run_dir"] = str(run.run_dir)
            report["steps"] = run.config.train.steps
            report["prompts"] = {
                "files": [prompt.file_index for prompt in run.train_set.prompts],
                "truncated": run.train_set.num_truncated,
                "lengths": [len(prompt.prompt_ids) for prompt in run.train_set.prompts],
            }
            with open(args.report, "w") as handle:
                json.dump(report, handle)
        run.close()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
