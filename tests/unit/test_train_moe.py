"""train/: the training script end to end at toy scale, its model card, its routing trace, and the
embedded default preferring the shipped checkpoint.

The toy run uses the real pipeline (corpus walk, tokenizer, training loop, save, reload, trace, card)
on a copy of a few standard-library modules, with tiny dimensions and a few steps.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train")
sys.path.insert(0, TRAIN)

import corpus  # noqa: E402
import model_card  # noqa: E402
import routing_trace  # noqa: E402

STDLIB_FILES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
                "functools.py", "contextlib.py", "abc.py", "copy.py", "random.py", "LICENSE.txt"]
TOPICS = "topics = {'if': 'The \"if\" statement is used for conditional execution.', 'pass': 'pass is a null operation.'}\n"
TOY = ["--steps", "4", "--heldout-every", "3", "--layers", "2", "--hidden", "32", "--intermediate", "32",
       "--experts", "4", "--heads", "2", "--kv-heads", "1", "--vocab", "320", "--seq-len", "32", "--batch", "4",
       "--log-every", "1", "--eval-tokens", "128", "--trace-tokens", "400", "--max-positions", "256", "--sample-tokens", "8"]


@pytest.fixture(scope="module")
def toy_stdlib(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    src = sysconfig.get_paths()["stdlib"]
    for f in STDLIB_FILES:
        shutil.copy(os.path.join(src, f), root / f)
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text(TOPICS)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('"""Excluded: a test directory."""\n')
    return str(root)


@pytest.fixture(scope="module")
def toy_run(toy_stdlib, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "model")
    proc = subprocess.run([sys.executable, os.path.join(TRAIN, "train_moe.py"), "--out", out, "--stdlib", toy_stdlib, *TOY],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_corpus_split_is_by_name_and_stable(toy_stdlib):
    a, b = corpus.load_corpus(toy_stdlib, heldout_every=3), corpus.load_corpus(toy_stdlib, heldout_every=3)
    assert a.stats() == b.stats()
    names = {d.name for d in a.train + a.heldout}
    assert "pydoc_data/topics.py:if" in names and "LICENSE.txt" in names and "textwrap.py" in names
    assert not any(n.startswith("test") for n in names)
    assert all(corpus.is_heldout(d.name, 3) for d in a.heldout) and not any(corpus.is_heldout(d.name, 3) for d in a.train)
    assert a.stats()["by_source"]["pydoc topics"]["documents"] == 2


def test_training_writes_a_checkpoint_both_loaders_accept(toy_run):
    from transformers import AutoModelForCausalLM

    from models.spec import load_spec
    out, stdout = toy_run
    assert "step 4/4" in stdout and "held-out perplexity" in stdout
    for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
              "loss_curve.png", "expert_load.png", "routing_trace.npz", "train_report.json"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    spec = load_spec(out)
    assert spec.family == "mixtral" and spec.num_experts == 4 and spec.num_layers == 2
    assert spec.eos_token_ids == (json.load(open(os.path.join(out, "tokenizer.json")))["added_tokens"][0]["id"],)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM" and not model.config.output_router_logits
    report = json.load(open(os.path.join(out, "train_report.json")))
    assert report["steps"] == 4 and report["tokens_seen"] == 4 * 4 * 32 and len(report["history"]) == 4


def test_shuttle_greedy_equals_transformers_on_the_trained_checkpoint(toy_run):
    from local_ranks import local_engine
    from scheduler.config import EngineConfig
    from scheduler.request import SamplingParams
    from tiny_models import hf_generate
    out, _ = toy_run
    prompts = [[5, 17, 200, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    ref, _ = hf_generate(out, prompts, 6)
    engine = local_engine(out, EngineConfig(attention_ranks=1, expert_ranks=2, micro_batches=2, max_batch_tokens=8))
    assert [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))] == ref


def test_card_fills_every_section(toy_run):
    out, _ = toy_run
    card = open(os.path.join(out, "README.md")).read()
    headings = [line[3:] for line in card.splitlines() if line.startswith("## ")]
    assert headings == model_card.SECTIONS
    bodies = card.split("\n## ")[1:]
    assert all(body.split("\n", 1)[1].strip() for body in bodies)
    assert "{" not in card.replace("{'", "") and "nan" not in card.lower().split()
    report = json.load(open(os.path.join(out, "train_report.json")))
    assert f"{report['heldout']['perplexity']:.1f}" in card and f"{report['heldout']['unigram_perplexity']:.1f}" in card
    assert card.count("- greedy: ") == len(report["samples"]) == 8
    del report["expert_load"]
    with pytest.raises(ValueError, match="expert_load"):
        model_card.card_text(report)


def test_routing_trace_command_writes_the_documented_format(toy_run, tmp_path):
    out, _ = toy_run
    text = tmp_path / "text.txt"
    text.write_text("Return the value of the named attribute of object. " * 8)
    path = str(tmp_path / "trace.npz")
    assert routing_trace.main(["--model", out, "--out", path, "--text-file", str(text), "--window", "16"]) == 0
    arrays, meta = routing_trace.load(path)
    assert set(arrays) == {"token_ids", "document", "window", "position", "experts", "weights", "logprob"}
    t = arrays["token_ids"].size
    assert meta["num_layers"] == 2 and meta["top_k"] == 2 and meta["num_experts"] == 4 and meta["window"] == 16
    assert arrays["experts"].shape == arrays["weights"].shape == (2, t, 2) and arrays["experts"].dtype == np.int16
    assert arrays["experts"].min() >= 0 and arrays["experts"].max() < 4
    assert (arrays["experts"][:, :, 0] != arrays["experts"][:, :, 1]).all()
    np.testing.assert_allclose(arrays["weights"].sum(-1), 1.0, rtol=1e-5)
    assert (arrays["position"] < 16).all() and t > 16 and arrays["window"].max() == (t - 1) // 16
    assert np.isnan(arrays["logprob"][arrays["position"] == 0]).all()
    assert (arrays["logprob"][arrays["position"] > 0] < 0).all()
    # The trace shipped next to the checkpoint, over held-out documents, has the same format.
    shipped, meta = routing_trace.load(os.path.join(out, "routing_trace.npz"))
    assert shipped["token_ids"].size == 400 and len(meta["documents"]) >= 1
    load = routing_trace.expert_load(shipped["experts"], 4)
    np.testing.assert_allclose(load.sum(1), 2.0)


def test_default_model_dir_prefers_the_shipped_checkpoint(toy_run, tmp_path, monkeypatch):
    import models.embedded as embedded
    out, _ = toy_run
    monkeypatch.setattr(embedded, "SHIPPED_DIR", out)
    assert embedded.default_model_dir() == out
    monkeypatch.setattr(embedded, "SHIPPED_DIR", str(tmp_path / "missing"))
    monkeypatch.setenv("SHUTTLE_CACHE", str(tmp_path / "cache"))
    assert embedded.shipped_model_dir() is None
    assert embedded.default_model_dir() == str(tmp_path / "cache" / f"embedded-v{embedded.VERSION}")


def test_training_refuses_a_non_empty_output_and_an_oversized_model(toy_run, toy_stdlib, tmp_path):
    out, _ = toy_run
    script = os.path.join(TRAIN, "train_moe.py")
    busy = subprocess.run([sys.executable, script, "--out", out, "--steps", "1"], capture_output=True, text=True, timeout=60)
    assert busy.returncode != 0 and "not empty" in busy.stderr
    big = subprocess.run([sys.executable, script, "--out", str(tmp_path / "big"), "--stdlib", toy_stdlib, *TOY,
                          "--hidden", "1024", "--intermediate", "2048", "--vocab", "320", "--heads", "8"],
                         capture_output=True, text=True, timeout=60)
    assert big.returncode != 0 and "exceeds the 25.0 MB budget" in big.stderr


def test_a_minutes_budget_becomes_a_step_count_that_reproduces_the_run():
    import train_moe
    args = train_moe.parse_args(["--out", "unused", "--minutes", "0.5", *TOY[2:]])   # TOY[:2] is --steps
    model = train_moe.build_model(args, 320, 0)
    before = [p.clone() for p in model.parameters()]
    windows = torch.randint(0, 320, (16, args.seq_len))
    steps = train_moe.steps_for_minutes(args, model, windows, 0.5, lambda msg: None)
    assert steps >= 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # probe on a copy
    assert train_moe.reproduce_argv(["--out", "d", "--minutes", "26", "--seed", "1"], 130) == \
        ["--out", "d", "--steps", "130", "--seed", "1"]
    assert sum(p.numel() for p in model.parameters()) == train_moe.parameter_count(args, 320)
