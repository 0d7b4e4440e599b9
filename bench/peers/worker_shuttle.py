"""Shuttle worker (Shuttle's .venv): `cluster.deployment.build_engine` + `Engine.generate`, as `shuttle run`
does; a private local Ray, 1 attention rank + 1 expert rank unless the job's `shuttle_opts` say otherwise.

    .venv/bin/python bench/peers/worker_shuttle.py JOB.json
"""

from __future__ import annotations

import dataclasses
import os
import sys

from workload import say, serve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
for k, v in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
             "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def config_for(job: dict):
    from scheduler.config import EngineConfig
    biggest = max(c["batch"] for c in job["cases"])
    fields = {"attention_ranks": 1, "expert_ranks": 1, "dtype": job["dtype"], "max_num_seqs": max(64, biggest)}
    # Shuttle's default threads are the node's cores per side; on a machine with more cores than the
    # benchmark's thread count, hold it to the same count as the peers.
    if (os.cpu_count() or 1) != job["threads"]:
        fields["threads_per_rank"] = job["threads"]
    fields.update(job.get("shuttle_opts", {}))
    types = {f.name: f.type for f in dataclasses.fields(EngineConfig)}
    for name, value in list(fields.items()):
        if name not in types:
            raise ValueError(f"--shuttle-opt {name}: not an EngineConfig field ({', '.join(types)})")
        if isinstance(value, str) and types[name] in ("bool", bool):
            fields[name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(value, str) and types[name] in ("int", "float", int, float):
            fields[name] = (int if types[name] in ("int", int) else float)(value)
    return EngineConfig(**fields)


def load(job: dict):
    import torch
    from cluster.deployment import build_engine
    from scheduler.request import SamplingParams
    config = config_for(job)
    engine = build_engine(job["model_dir"], config, progress=say)

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))]

    info = {"torch": torch.__version__, "config": dataclasses.asdict(config), "pid": os.getpid()}
    return generate, info, engine.shutdown


if __name__ == "__main__":
    serve(load)
