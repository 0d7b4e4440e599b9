"""The embedded demo model's random-weight fallback: deterministic, loadable, generated atomically
under concurrent first runs. (The shipped trained checkpoint: test_train_moe.py, test_shipped_model.py.)"""

import hashlib
import json
import os
import subprocess
import sys

from models.embedded import build_tokenizer, write_model
from models.spec import load_spec


def digest(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def test_generation_is_deterministic_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_model(str(a)), write_model(str(b))
    assert digest(a) == digest(b)
    spec = load_spec(str(a))
    tok = build_tokenizer()
    assert spec.family == "mixtral" and spec.num_experts == 8 and spec.vocab_size == tok.get_vocab_size()
    assert spec.eos_token_ids == (tok.token_to_id("<|endoftext|>"),)
    assert json.load(open(a / "config.json"))["vocab_size"] == spec.vocab_size
    text = "Hello, Shuttle! ünïcödé 🚀"
    assert tok.decode(tok.encode(text).ids) == text


def test_concurrent_first_runs_share_one_complete_directory(tmp_path):
    env = {**os.environ, "SHUTTLE_CACHE": str(tmp_path)}
    code = "from models.embedded import generated_model_dir; print(generated_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
             for _ in range(2)]
    dirs = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(dirs) == 1
    (model_dir,) = dirs
    assert os.listdir(tmp_path) == [os.path.basename(model_dir)]  # no temporary directory left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
