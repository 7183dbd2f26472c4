"""Run a plan of jobs in one set of processes, each job under its own Megatron layout.

    python suite.py PLAN OUT                              # a world of one
    torchrun --nproc_per_node 2 suite.py PLAN OUT         # several ranks

Started by tests/jobs.py, so that the test suite starts Python, torch and Megatron once per world
size instead of once per check. ``PLAN`` is a JSON list of jobs (see ``tests.jobs.Job``). Each job
re-creates Megatron's groups for its layout, re-seeds, runs the checks of its kind and, on rank 0,
writes its report to ``OUT/<index>.json``. A job that raises writes the traceback to
``OUT/<index>.rank<r>.error`` and ends the process at once: the other ranks may be waiting in a
collective, and torchrun stops them; tests/jobs.py starts the remaining jobs again.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":
    # Not when Megatron's checkpoint writer, a spawned process, runs this file's top level again
    # before its own work: it needs none of this, which takes seconds to import.
    import torch.distributed as dist

    import bridge_check
    import checkpoint_check
    import forward_check
    import head_check
    import layout_step
    import offload_check
    import packing_check
    import router_freeze_check
    import routing_check
    import stream_check
    import teacher_check
    from common import add_layout_arguments, initialize, run
    from megarl.models.builder import build_model, model_spec
    from megarl.models.loader import load_hf_config, load_hf_weights


def layout_job(model: str, layout, pg_collection, checks: dict) -> dict:
    """The checks asked of a model under one layout; ``logits`` and ``buckets`` share one model
    loaded from the HF checkpoint (``buckets`` last: it changes the weights)."""
    report = {}
    if "logits" in checks or "buckets" in checks:
        spec = model_spec(load_hf_config(model), layout)
        chunks = build_model(spec, "torch", pg_collection)
        load_hf_weights(chunks, spec, pg_collection, model)
        if "logits" in checks:
            report["logits"] = bridge_check.check(chunks, spec, pg_collection, model)
        if "buckets" in checks:
            report["buckets"] = stream_check.check(chunks, spec, pg_collection, **checks["buckets"])
    if "gradients" in checks:
        report["gradients"] = layout_step.check(model, layout, pg_collection, **checks["gradients"])
    if "routing" in checks:
        report["routing"] = routing_check.check(model, layout, pg_collection)
    if "packing" in checks:
        report["packing"] = packing_check.check(model, layout, pg_collection, **checks["packing"])
    if "head" in checks:
        report["head"] = head_check.check(model, layout, pg_collection, **checks["head"])
    if "offload" in checks:
        report["offload"] = offload_check.check(model, layout, pg_collection)
    if "teacher" in checks:
        report["teacher"] = teacher_check.check(model, layout, pg_collection, **checks["teacher"])
    if "forward" in checks:
        report["forward"] = forward_check.check(model, layout, pg_collection)
    if "router_freeze" in checks:
        report["router_freeze"] = router_freeze_check.check(model, layout, pg_collection)
    return report


def checkpoint_job(model: str, layout, pg_collection, checks: dict) -> dict:
    (mode, options), = checks.items()
    return {mode: getattr(checkpoint_check, mode)(model, layout, pg_collection, **options)}


KINDS = {"layout": layout_job, "checkpoint": checkpoint_job}


def main(argv):
    # What the imports made lives as long as the process: the collections after each job (below,
    # and Megatron's when a distributed optimizer saves) need not walk it again.
    gc.freeze()
    plan_path, out = argv
    plan = json.loads(Path(plan_path).read_text())
    layout_parser = argparse.ArgumentParser()
    add_layout_arguments(layout_parser)
    for index, job in enumerate(plan):
        try:
            layout, pg_collection = initialize(layout_parser.parse_args(job["layout"]))
            report = KINDS[job["kind"]](job["model"], layout, pg_collection, job["checks"])
            # No rank starts the next job (or reports this one) while another may still fail.
            dist.barrier()
        except BaseException:
            rank = dist.get_rank() if dist.is_initialized() else 0
            Path(out, f"{index:03d}.rank{rank}.error").write_text(traceback.format_exc())
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        if dist.get_rank() == 0:
            Path(out, f"{index:03d}.json").write_text(json.dumps(report))
        del report
        gc.collect()


if __name__ == "__main__":
    run(main)
