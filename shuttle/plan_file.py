"""Deployment plan files (YAML or JSON): the EngineConfig fields a plan fixes.

    attention_ranks: 2
    expert_ranks: 3
    micro_batches: 3
    max_num_seqs: 64

A file may hold those keys at the top level or under `engine:`. `shuttle tune plan` writes the
second layout, with its own sections next to it (`plan:` the devices and shape chosen, `prediction:`
the predicted times, `why:` the reasons); those known sections are read past. Unknown keys (at the
top level of a file with `engine:`, or inside the engine settings) are errors. Command-line flags
override the file.
"""

from __future__ import annotations

import yaml

from scheduler.config import EngineConfig

TUNER_SECTIONS = ("plan", "prediction", "why", "search", "profile")   # written by `shuttle tune plan`, not engine settings


def load_plan_values(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"plan file {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"plan file {path!r} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"plan file {path!r} must hold a mapping of engine settings")
    if "engine" in data:
        unknown = sorted(set(data) - {"engine", *TUNER_SECTIONS})
        if unknown:
            raise ValueError(f"plan file {path!r}: unknown sections {', '.join(map(str, unknown))} "
                             f"(known: engine, {', '.join(TUNER_SECTIONS)})")
    values = data.get("engine", data)
    if not isinstance(values, dict):
        raise ValueError(f"plan file {path!r}: 'engine' must be a mapping")
    values = {k: v for k, v in values.items()}
    try:
        EngineConfig.from_dict(values)  # validate now, with the file's name in the message
    except (TypeError, ValueError) as e:
        raise ValueError(f"plan file {path!r}: {e}") from None
    return values
