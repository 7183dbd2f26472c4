"""Convert a HuggingFace model directory into a megarl distributed checkpoint.

    python tools/convert_from_hf.py --hf path/to/hf_model --out checkpoints
    torchrun --nproc_per_node 2 tools/convert_from_hf.py --hf HF --out OUT --tp 2

Each rank reads only the slices of the safetensors its layout owns. The checkpoint can be loaded
later under any other layout; training resumes from it with ``checkpoint.resume=<path>``.
"""

from __future__ import annotations

import argparse
import sys

from megarl.models.convert import hf_to_checkpoint
from megarl.models.loader import CheckpointError as HFCheckpointError
from megarl.config import ParallelConfig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to write step_00000000 into")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    args = parser.parse_args(argv)
    layout = ParallelConfig(
        tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vpp, expert=args.ep, expert_tensor=args.etp
    )
    try:
        out = hf_to_checkpoint(args.hf, args.out, layout, dtype=args.dtype)
    except (HFCheckpointError, FileNotFoundError, OSError) as error:
        print(f"convert_from_hf: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
