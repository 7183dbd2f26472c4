"""megarl's training loop on several torchrun "nodes", with checks (worker for tests/trainer/test_two_nodes.py).

Every node's first rank writes ``--report-dir/node{N}.json``: its engines' names and URLs, for each
step the names of the HF weights its engines hold that differ from the exporter's tensors
(``export_hf_tensors`` to that rank, after the step's weight update), its engines' pids before the
first step and at the end, its restarts, and, on the first rank, the engines it generates on, where
its requests go and the router's workers at the start and the end. With ``--kill-engine-after K`` the last node's first rank SIGKILLs its
engines after step K: its own supervisor restarts them, on its node, with the current weights.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path


def main(argv=None) -> None:
    launched_at = time.time()
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--config")
    parser.add_argument("--kill-engine-after", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)

    import torch
    import torch.distributed as dist

    from engine_weights import read_weights
    from megarl.config import load_config
    from megarl.models.exporter import export_hf_tensors
    from megarl.nodes import Node, node_ranks
    from megarl.trainer import loop
    from megarl.trainer.run import setup

    run = setup(load_config(args.config, args.overrides), launched_at=launched_at)
    node = Node.from_env()
    leaders = [ranks[0] for ranks in node_ranks()]
    report = {"node": node.index, "ranks": dist.get_world_size(), "differing": {}, "completed": False}
    if run.engines is not None:
        report["engines"] = run.engines.addresses()
        report["pids_before"] = run.engines.pids()
    if run.is_first_rank:
        report["generates_on"] = [engine.name for engine in run.engines.remote_engines]
        report["router"] = run.router.workers() if run.router is not None else None
        report["route"] = run.engines.route(0).name

    def check_engines(label: str) -> None:
        """Each node's engines against the exporter (collective: one export to every node's first rank)."""
        model = run.policy.model
        for leader in leaders:
            exported = dict(export_hf_tensors(model.chunks, model.spec, run.pg_collection, dst=leader))
            if dist.get_rank() == leader:
                differing = []
                for index in range(len(run.engines.engines)):
                    held = read_weights(run.engines, exported, engine_index=index)
                    differing += [f"{index}:{name}" for name, tensor in exported.items() if not torch.equal(held[name], tensor.to(held[name].dtype))]
                report["differing"][label] = differing

    original_step = loop.train_step

    def step_with_checks(run_, step, phase=lambda name: None):
        metrics = original_step(run_, step, phase)
        check_engines(f"after_{step}")
        if step == args.kill_engine_after and run.engines is not None and node.index == len(leaders) - 1:
            for pid in run.engines.pids().values():
                os.kill(pid, signal.SIGKILL)
        return metrics

    loop.train_step = step_with_checks
    try:
        loop.fit(run)
        report["completed"] = True
    finally:
        if run.is_first_rank and run.router is not None:
            report["router_after"] = run.router.workers()
        if run.engines is not None:
            report["restarts"] = run.engines.restarts
            report["pids_after"] = run.engines.pids()
            args.report_dir.mkdir(parents=True, exist_ok=True)
            (args.report_dir / f"node{node.index}.json").write_text(json.dumps(report))
        run.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
