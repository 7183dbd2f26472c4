"""``python -m megarl.config --config FILE [key=value ...] [--print] [--world-size N] [--memory]``: load
a config, check it as a run would before it starts, and optionally print it resolved; or, with
``--memory``, print the device memory per GPU its layout needs (:mod:`megarl.config.memory`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import yaml

from pathlib import Path

from megarl.config import Config, ConfigError, ModelFacts, load_config, resolve_model_path, validate
from megarl.config.memory import memory_table
from megarl.preflight import check_run


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megarl.config``: load, check as a run would before it starts (the config, the
    model, data and reward files, the checkpoint a resume would load: :mod:`megarl.preflight`), and
    optionally print the resolved config.

    Returns:
        0 when the config is valid, 2 (after printing the message) when it is not.
    """
    parser = argparse.ArgumentParser(prog="python -m megarl.config", description="Resolve and check a megarl config.")
    parser.add_argument("--config", help="YAML file; omit for the defaults")
    parser.add_argument("--print", action="store_true", help="print the resolved config (every key) as YAML")
    parser.add_argument("--world-size", type=int, help="training processes; default: $WORLD_SIZE, else the layout's minimum")
    parser.add_argument(
        "--memory", action="store_true",
        help="print the memory per GPU of the layout (parameters, gradients, optimizer, activations, engines) with and without train.offload",
    )
    parser.add_argument("--device-gib", type=float, default=80.0, help="with --memory: GPU memory in GiB (default 80, an H100)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied after the file")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        world_size = args.world_size
        if world_size is None:
            environment = os.environ.get("WORLD_SIZE", "")
            if environment and not environment.isdigit():
                raise ConfigError(f"WORLD_SIZE={environment!r} must be a positive integer")
            world_size = int(environment) if environment else config.parallel.min_world_size()
    except ConfigError as error:
        # A config breaking several rules gives one line each.
        print("\n".join(f"megarl.config: {line}" for line in str(error).splitlines()), file=sys.stderr)
        return 2
    if args.memory:
        try:
            model_dir = _architecture_dir(config, args.config)
            validate(config, world_size, ModelFacts.from_hf_dir(model_dir))
            print(f"architecture: {model_dir / 'config.json'}")
            print(memory_table(config, world_size, json.loads((model_dir / "config.json").read_text()), args.device_gib))
        except ConfigError as error:
            print("\n".join(f"megarl.config: {line}" for line in str(error).splitlines()), file=sys.stderr)
            return 2
        return 0
    problems = check_run(config, world_size)
    if problems:
        print("\n".join(f"megarl.config: {problem}" for problem in problems), file=sys.stderr)
        return 2
    warning = config.train.warmup_clamped()
    if warning:
        print(f"megarl.config: warning: {warning}", file=sys.stderr)
    if args.print:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    else:
        print(f"{args.config or 'defaults'}: valid for world size {world_size} (DP {config.parallel.data_parallel(world_size)})")
    return 0


def _architecture_dir(config: Config, config_file: str | None) -> Path:
    """Where ``--memory`` reads the model's config.json: ``model.path``, or, when that directory is
    not on this machine, the published architecture kept beside the config file
    (``architectures/<model directory's name>/config.json``, as for the recipes)."""
    model_dir = resolve_model_path(config.model.path)
    if (model_dir / "config.json").is_file():
        return model_dir
    if config_file is not None:
        beside = Path(config_file).parent / "architectures" / model_dir.name
        if (beside / "config.json").is_file():
            return beside
    raise ConfigError(
        f"`model.path` = {config.model.path!r}: no config.json there (nor architectures/{model_dir.name}/config.json beside the config file): "
        "--memory needs the model's config.json alone, no weights"
    )


if __name__ == "__main__":
    sys.exit(main())
