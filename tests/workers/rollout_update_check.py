"""Stream a Megatron model's weights into a running rollout engine, once per transport.

torchrun worker for tests/rollout/test_update_from_stream.py. The ranks build the model with Megatron's
random initialisation (so its weights differ from the checkpoint the engine started from) and a
:class:`~megarl.weights.stream.WeightStream` to rank 0, which hands its buckets to
``EngineGroup.update_weights``. Before each further transport every parameter is perturbed, so
each update changes the weights. After each update the bridge exporter gives the reference HF
tensors and rank 0 reads every weight back from the engine; it writes a JSON report (the names
whose engine copy differs from the exporter's, per transport) and saves the last reference
tensors as safetensors.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from common import add_layout_arguments, initialize, run
from engine_weights import read_weights
from megarl.models.builder import build_model, model_spec
from megarl.models.loader import load_hf_config
from megarl.models.exporter import export_hf_tensors
from megarl.rollout import EngineGroup
from megarl.weights.stream import WeightStream


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    add_layout_arguments(parser)
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--transports", default="tensor,nccl")
    parser.add_argument("--bucket-mb", type=float, default=1 / 16, help="small: several buckets")
    parser.add_argument("--report", required=True)
    parser.add_argument("--exported", required=True, help="where rank 0 saves the last reference tensors")
    return parser.parse_args(argv)


def perturb(chunks, seed: int) -> None:
    """Add noise to every parameter; replicas on different ranks draw the same noise."""
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=draw))


def main(argv):
    args = parse_args(argv)
    layout, pg_collection = initialize(args)
    spec = model_spec(load_hf_config(args.model), layout)
    chunks = build_model(spec, "torch", pg_collection)
    stream = WeightStream(chunks, spec, pg_collection, bucket_mb=args.bucket_mb, dst=0)
    rank0 = dist.get_rank() == 0
    engines = EngineGroup.connect([args.engine_url], engine="hf", model_path=args.model, health_check_interval_s=3600) if rank0 else None
    report, exported = {}, {}
    try:
        for version, transport in enumerate(args.transports.split(","), start=1):
            if version > 1:
                perturb(chunks, seed=version)
            buckets = stream.buckets()
            if rank0:
                engines.weight_transport = transport
                engines.update_weights(buckets, version=version)
            for _ in buckets:
                pass  # the other ranks' iteration drives their sends
            exported = dict(export_hf_tensors(chunks, spec, pg_collection, dst=0))
            if rank0:
                held = read_weights(engines, exported)
                report[transport] = [name for name, tensor in exported.items() if not torch.equal(held[name], tensor)]
    finally:
        if engines is not None:
            engines.shutdown()
    if rank0:
        save_file({name: tensor.contiguous() for name, tensor in exported.items()}, args.exported)
        with open(args.report, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    run(main)
