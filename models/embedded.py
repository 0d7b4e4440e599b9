"""The embedded default model: a small Mixtral-style MoE that needs no download.

`shuttle serve` and `shuttle run` use it when no `--model` is given, so a newcomer's first command
works on any machine. Two sources, in this order:

1. The shipped checkpoint, `models/shipped/shuttle-moe-tiny/` (SHIPPED_DIR): trained on the text
   that ships with CPython by `train/train_moe.py` (see train/README.md and its model card). It
   writes English-like text and its router was learned.
2. Where it is missing (not yet committed, or an install that left the data files out), a
   fallback generated once, deterministically (a byte-level BPE tokenizer trained on the text
   below, random weights from a fixed seed), into `$SHUTTLE_CACHE/embedded-<VERSION>` (default
   `~/.cache/shuttle`). Generation writes a temporary directory and renames it into place, so
   concurrent first runs never see a half-written model. Its weights are random: it shows the
   machinery (tokenizer, experts, streaming), not language. Bump VERSION whenever what is
   generated changes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped", "shuttle-moe-tiny")
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

VERSION = 1
SEED = 1234
EOS = "<|endoftext|>"

# Architecture: small enough to load in a second and decode quickly on 2 CPU cores.
ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048)
TOKENIZER_VOCAB = 768

# The tokenizer's training text (fixed here, so the vocabulary never depends on the machine).
CORPUS = """\
Shuttle serves Mixture-of-Experts language models with attention and experts disaggregated.
Attention ranks hold the embeddings, the attention layers, the router and the paged KV cache of
their own requests. Expert ranks hold the routed experts. Every token shuttles between them once
per MoE layer: the hidden states of routed tokens are dispatched to the expert ranks that own the
chosen experts, and the expert outputs are combined back, summed per token with the router weights.
A step is one forward pass of the whole model over the current batch. A batch is split into
micro-batches that ping-pong between the two sides so that attention compute, expert compute and
the token transfer overlap. The scheduler batches requests continuously: new requests join the
running batch at the next step, prompts are prefilled in chunks, and each running request gets one
new token per step until it reaches its length, its end-of-sequence token or a stop string.
Clients talk gRPC: Generate answers once, GenerateStream sends tokens as they are sampled.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Although practicality
beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of
ambiguity, refuse the temptation to guess. There should be one-- and preferably only one --obvious
way to do it. Now is better than never. Although never is often better than *right* now.
If the implementation is hard to explain, it's a bad idea. If the implementation is easy to
explain, it may be a good idea. Namespaces are one honking great idea -- let's do more of those!
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 (a, b) [x] {k: v} <tag> "quoted"
def generate(prompt, max_tokens=16, temperature=0.0): return model.sample(prompt, max_tokens)
"""


def cache_root() -> str:
    return os.environ.get("SHUTTLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "shuttle")


def shipped_model_dir() -> str | None:
    """The shipped trained checkpoint's directory, or None where any of its files is missing."""
    if all(os.path.isfile(os.path.join(SHIPPED_DIR, f)) for f in SHIPPED_FILES):
        return SHIPPED_DIR
    return None


def default_model_dir() -> str:
    """The shipped checkpoint if present, else the generated fallback (made on first use, safe
    under concurrent calls), with a warning: its output is noise."""
    shipped = shipped_model_dir()
    if shipped:
        return shipped
    logging.getLogger("shuttle.models").warning(
        "the trained demo model is missing from this install (%s): using a random-weight stand-in whose "
        "text is noise; reinstall Shuttle or pass --model DIR", SHIPPED_DIR)
    return generated_model_dir()


def generated_model_dir() -> str:
    """The random-weight fallback's directory, generating it on first use."""
    final = os.path.join(cache_root(), f"embedded-v{VERSION}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".embedded-v{VERSION}-", dir=cache_root())
    try:
        write_model(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    return tok


def write_model(out_dir: str) -> str:
    """Write tokenizer.json, config.json and model.safetensors into out_dir (deterministic)."""
    import torch
    import transformers as tf

    tok = build_tokenizer()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    cfg = tf.MixtralConfig(vocab_size=tok.get_vocab_size(), eos_token_id=eos_id, bos_token_id=None,
                           pad_token_id=None, tie_word_embeddings=False, sliding_window=None, **ARCH)
    torch.manual_seed(SEED)
    model = tf.MixtralForCausalLM(cfg)
    with torch.no_grad():  # HF inits some weights to zero or tiny; spread them so routing and norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15 if "gate" in name and "proj" not in name else 0.08)
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                   "model_max_length": ARCH["max_position_embeddings"]}, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"Shuttle's embedded demo model v{VERSION}: Mixtral-style MoE with random weights "
                f"(seed {SEED}); generated by models/embedded.py. Output is not language.\n")
    return out_dir
