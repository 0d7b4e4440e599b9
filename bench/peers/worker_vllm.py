"""vLLM (CPU build) worker, run with the python of the venv setup_peers.py made: offline `LLM.generate`
on token ids, greedy, exactly n new tokens, prefix caching off (the warm-up must not pre-fill the timed call).

    ~/.cache/shuttle-peers/vllm/venv/bin/python bench/peers/worker_vllm.py JOB.json

Its OpenMP threads are bound to cores 0..threads-1 (VLLM_CPU_OMP_THREADS_BIND): left on auto, its
worker got one core on the 2-core machine and ran ~1.4x slower at batch 1 (shared/PEERS.md).
"""

from __future__ import annotations

import os

from workload import serve


def load(job: dict):
    threads = job["threads"]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")         # GiB
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    longest = max(c["prompt_len"] + max(c["new_tokens"], c["warmup_tokens"]) for c in job["cases"])
    biggest = max(c["batch"] for c in job["cases"])
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], skip_tokenizer_init=True,
              max_model_len=max(512, -(-longest // 256) * 256), max_num_seqs=max(256, biggest),
              enable_prefix_caching=False, seed=0, **job.get("vllm_opts", {}))

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    info = {"vllm": vllm.__version__, "torch": torch.__version__, "pid": os.getpid(),
            "omp_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "kvcache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"]}
    return generate, info, lambda: None


if __name__ == "__main__":
    serve(load)
