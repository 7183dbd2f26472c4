"""What the torchrun test workers share: layout flags, set-up and tear-down."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from megarl import parallel, platform
from megarl.config import ParallelConfig


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--sp", action="store_true")


def initialize(args: argparse.Namespace):
    """Start torch.distributed and Megatron's groups for the layout in ``args``; seed everything."""
    platform.init_distributed()
    layout = ParallelConfig(
        tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vpp, context=args.cp,
        expert=args.ep, expert_tensor=args.etp, sequence_parallel=args.sp,
    )
    pg_collection = parallel.initialize(layout)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return layout, pg_collection


def run(main) -> None:
    """Run ``main(argv)`` and always tear the process groups down."""
    try:
        main(sys.argv[1:])
    finally:
        parallel.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
