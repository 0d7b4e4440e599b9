"""A random-weight Mixtral checkpoint for benchmarks, built once (atomically) into a cache folder."""

from __future__ import annotations

import os
import sys


def build_random_mixtral(path: str, **config) -> str:
    """`path`, holding a MixtralForCausalLM with `config` and weights ~ N(0, 0.02); reused if present."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    print(f"building the benchmark model in {path} ...", file=sys.stderr)
    cfg = MixtralConfig(eos_token_id=None, bos_token_id=None, **config)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path
