"""Export a megarl distributed checkpoint as a HuggingFace model directory.

    python tools/convert_to_hf.py --checkpoint runs/x/checkpoints --out hf_out
    torchrun --nproc_per_node 2 tools/convert_to_hf.py --checkpoint CKPT --out OUT --ep 2

The output (config, tokenizer, sharded safetensors with an index) loads with
``transformers.AutoModelForCausalLM.from_pretrained``. The checkpoint may have been saved under any
parallel layout; it is resharded to the layout given here (a single process by default).
"""

from __future__ import annotations

import argparse
import sys

from megarl.models.convert import DEFAULT_MAX_SHARD_BYTES, checkpoint_to_hf
from megarl.config import ParallelConfig
from megarl.trainer.checkpoint import CheckpointError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_NNNNNNNN directory, or a root (latest is used)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the dtype the config declares")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to load with")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to load with")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size to load with")
    args = parser.parse_args(argv)
    try:
        out = checkpoint_to_hf(
            args.checkpoint,
            args.out,
            ParallelConfig(tensor=args.tp, pipeline=args.pp, expert=args.ep),
            dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
        )
    except (CheckpointError, FileNotFoundError) as error:
        print(f"convert_to_hf: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
