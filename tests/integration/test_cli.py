"""`shuttle run` end to end: JSON lines equal to transformers, logprobs, clean exit, clear errors."""

import json
import os
import subprocess
import sys
import time

import psutil

from tiny_models import hf_generate

PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [42]]


def shuttle(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "shuttle.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ray_processes_since(t0: float) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] >= t0 - 1 and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd):
                found.append(cmd[:120])
        except psutil.Error:
            pass
    return found


def test_run_prints_hf_greedy_tokens_and_leaves_nothing_running(tiny_model, tmp_path):
    model = tiny_model("qwen2_moe")
    ref, ref_logits = hf_generate(model, PROMPTS, 12)
    t0 = time.time()
    r = shuttle("run", "--model", model, "--attention-ranks", "2", "--expert-ranks", "3", "--micro-batches", "2",
                "--max-tokens", "12", "--logprobs", "--prompt-ids", *[",".join(map(str, p)) for p in PROMPTS])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["token_ids"] for line in lines] == ref
    assert all(line["finish_reason"] == "length" for line in lines)
    for line, logits in zip(lines, ref_logits):
        expected = logits.log_softmax(-1).max(-1).values.tolist()
        assert max(abs(a - b) for a, b in zip(line["logprobs"], expected)) < 1e-4
    assert "tokens/s" in r.stderr
    for _ in range(20):        # Ray's own processes go away after the driver's shutdown
        if not ray_processes_since(t0):
            break
        time.sleep(0.5)
    assert not ray_processes_since(t0)


def test_prompts_file_sampling_seed_and_bfloat16(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"token_ids": p}) for p in PROMPTS) + "\n")
    args = ("run", "--model", model, "--prompts-file", str(f), "--max-tokens", "6", "--temperature", "0.9",
            "--seed", "7", "--dtype", "bfloat16", "--micro-batches", "1")
    a, b = shuttle(*args), shuttle(*args)
    assert a.returncode == 0, a.stderr[-2000:]
    out = [json.loads(line)["token_ids"] for line in a.stdout.splitlines()]
    assert [len(t) for t in out] == [6, 6, 6] and all(0 <= t < 256 for ts in out for t in ts)
    assert out == [json.loads(line)["token_ids"] for line in b.stdout.splitlines()]   # same seed, same tokens


def test_bad_input_is_a_clear_error_not_a_hang(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    r = shuttle("run", "--model", model, "--prompt-ids", "1,2,x")
    assert r.returncode == 1 and "not a comma-separated list of integers" in r.stderr
    r = shuttle("run", "--model", model, "--prompt-ids", "1,2,999")
    assert r.returncode == 1 and "token_ids" in r.stderr and "vocabulary" in r.stderr
    r = shuttle("run", "--model", str(tmp_path), "--prompt-ids", "1")
    assert r.returncode == 1 and "no config.json" in r.stderr
    r = shuttle("run", "--model", model, "--expert-ranks", "9", "--prompt-ids", "1")
    assert r.returncode == 1 and "9 expert ranks for 8 experts" in r.stderr
