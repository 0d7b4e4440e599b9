"""`shuttle` console script: wires the house (cluster/ builds the ranks, scheduler/ drives them).

Subcommands register themselves through `COMMANDS`: each module exposes `add_parser(subparsers)`
returning its parser with `func` set.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys

from scheduler.config import EngineConfig

COMMANDS = ["shuttle.run_cmd", "shuttle.serve_cmd", "shuttle.cluster_cmd", "shuttle.tune_cmd"]


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, so every command (and the tuner) speaks the same names."""
    group = parser.add_argument_group("deployment")
    for f in dataclasses.fields(EngineConfig):
        kind = type(f.default)
        group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {f.default})")


def engine_config(args: argparse.Namespace, base: dict | None = None) -> EngineConfig:
    """EngineConfig from flags given on the command line, over `base` (a plan file's values)."""
    values = dict(base or {})
    for f in dataclasses.fields(EngineConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return EngineConfig.from_dict(values)


def setup_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shuttle", description="Serve MoE models with attention and experts disaggregated.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    setup_environment()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}) if getattr(args, "json_errors", False)
              else f"shuttle {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
