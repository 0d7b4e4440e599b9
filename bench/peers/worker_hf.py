"""Hugging Face `generate` worker (Shuttle's .venv): greedy, exactly n new tokens, torch threads = job threads.

    .venv/bin/python bench/peers/worker_hf.py JOB.json
"""

from __future__ import annotations

import os

from workload import serve


def load(job: dict):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=getattr(torch, job["dtype"])).eval()

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts)                  # [B, L]: every prompt has the same length, no padding
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    info = {"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "pid": os.getpid()}
    return generate, info, lambda: None


if __name__ == "__main__":
    serve(load)
