"""Convert a HuggingFace model directory into a megarl distributed checkpoint.

    python tools/convert_from_hf.py --hf path/to/hf_model --out checkpoints
    torchrun --nproc_per_node 2 tools/convert_from_hf.py --hf HF --out OUT --tp 2

Each rank reads only the slices of the safetensors its layout owns. The checkpoint can be loaded
later under any other layout; training resumes from it with ``checkpoint.resume=<path>``.

Before anything is built the model directory and the layout are checked: a config.json
transformers reads, an architecture and options megarl implements, complete safetensors files
whose tensors are exactly those the model uses, and a layout that fits the model and the number
of processes. Each problem is one line naming the file or option; the exit code is then 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megarl.cli import positive


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to write step_00000000 into")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--tp", type=positive, default=1)
    parser.add_argument("--pp", type=positive, default=1)
    parser.add_argument("--vpp", type=positive, default=None)
    parser.add_argument("--ep", type=positive, default=1)
    parser.add_argument("--etp", type=positive, default=None)
    args = parser.parse_args(argv)
    # Light imports: the checks below come before torch.distributed, Megatron and the model.
    from megarl.cli import check_layout, run_conversion
    from megarl.config import ConfigError, ParallelConfig
    from megarl.models.families import checked_family
    from megarl.models.family import UnsupportedModel
    from megarl.models.loader import CheckpointError, HFCheckpoint, load_hf_config

    layout = ParallelConfig(
        tensor=args.tp, pipeline=args.pp, virtual_pipeline=args.vpp, expert=args.ep, expert_tensor=args.etp,
        sequence_parallel=args.tp > 1,
    )

    def convert() -> Path:
        hf_config = load_hf_config(args.hf)
        checked_family(hf_config)
        HFCheckpoint(args.hf).check_names(hf_config)
        check_layout(layout, args.hf)
        from megarl.models.convert import hf_to_checkpoint

        return hf_to_checkpoint(args.hf, args.out, layout, dtype=args.dtype)

    return run_conversion("convert_from_hf", convert, bad_input=(CheckpointError, UnsupportedModel, ConfigError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
