"""``python -m megarl.config --config FILE [key=value ...] [--print] [--world-size N]``: load a config,
check it as a run would before it starts, and optionally print it resolved."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import yaml

from megarl.config import ConfigError, load_config
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


if __name__ == "__main__":
    sys.exit(main())
