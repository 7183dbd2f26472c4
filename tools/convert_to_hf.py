"""Export a megarl distributed checkpoint as a HuggingFace model directory.

    python tools/convert_to_hf.py --checkpoint runs/x/checkpoints --out hf_out
    torchrun --nproc_per_node 2 tools/convert_to_hf.py --checkpoint CKPT --out OUT --ep 2

The output (config with the tensors' ``dtype``, tokenizer, sharded safetensors with an index) loads
with ``transformers.AutoModelForCausalLM.from_pretrained``. The checkpoint may have been saved
under any parallel layout; it is resharded to the layout given here (a single process by default).
``--out`` is created, or replaced whole if it is a HF model directory (a previous export): it then
holds exactly the new files.

Before anything is built the checkpoint, the output directory and the layout are checked: a
committed checkpoint whose files are all whole, a HF config of an architecture megarl implements,
an output directory that is new, empty or a HF model directory, and a layout that fits the model
and the number of processes. Each problem is one line naming the file or option; the exit code is
then 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megarl.cli import positive


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step_NNNNNNNN directory, or a root (latest is used)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the dtype the config declares")
    parser.add_argument("--max-shard-gb", type=float, help="largest safetensors file in GB (default: HF's, 5)")
    parser.add_argument("--tp", type=positive, default=1, help="tensor parallel size to load with")
    parser.add_argument("--pp", type=positive, default=1, help="pipeline parallel size to load with")
    parser.add_argument("--ep", type=positive, default=1, help="expert parallel size to load with")
    args = parser.parse_args(argv)
    # Light imports: the checks below come before torch.distributed, Megatron and the model.
    from megarl.cli import check_layout, run_conversion
    from megarl.config import ConfigError, ParallelConfig
    from megarl.models.families import checked_family
    from megarl.models.family import UnsupportedModel
    from megarl.models.loader import CheckpointError as ModelError, load_hf_config
    from megarl.checkpoint import hf_files
    from megarl.resume import CheckpointError, check_files, committed_checkpoint

    layout = ParallelConfig(tensor=args.tp, pipeline=args.pp, expert=args.ep, sequence_parallel=args.tp > 1)

    def convert() -> Path:
        path = committed_checkpoint(args.checkpoint)
        checked_family(load_hf_config(hf_files(path)))
        check_layout(layout, hf_files(path))
        check_files(path)
        from megarl.models.convert import DEFAULT_MAX_SHARD_BYTES, check_export_target, checkpoint_to_hf

        check_export_target(args.out)
        max_shard_bytes = int(args.max_shard_gb * 1024**3) if args.max_shard_gb else DEFAULT_MAX_SHARD_BYTES
        return checkpoint_to_hf(path, args.out, layout, dtype=args.dtype, max_shard_bytes=max_shard_bytes)

    return run_conversion(
        "convert_to_hf", convert, bad_input=(CheckpointError, ModelError, UnsupportedModel, ConfigError)
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
