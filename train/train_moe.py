"""Train Shuttle's shipped demo MoE: a small Mixtral-format model on the text CPython ships with.

    .venv/bin/python train/train_moe.py --out DIR --steps N          # reproducible: fixed seeds, fixed data order
    .venv/bin/python train/train_moe.py --out DIR --minutes 25       # steps from the measured step time (printed)

Writes into DIR (created, must be empty or absent): config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, README.md (the model card),
loss_curve.png, expert_load.png, routing_trace.npz (train/routing_trace.py's format) and
train_report.json (every number in the card; `python train/model_card.py DIR` rewrites the card).

The pipeline: corpus (train/corpus.py) → byte-level BPE tokenizer trained on the training split →
documents shuffled with the seed, each followed by <|endoftext|>, concatenated, cut into windows of
--seq-len tokens → transformers' MixtralForCausalLM, AdamW, linear warm-up then cosine decay, the
router's load-balancing loss (`router_aux_loss_coef`) added to the cross-entropy → saved, reloaded
from disk and measured: held-out perplexity against a unigram model of the training tokens,
per-layer expert loads on held-out text, samples.

Same seed, settings, corpus digest and thread count → the same weights (threads change the order
of float sums; the default is 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EOS = "<|endoftext|>"
SAMPLE_PROMPTS = ["Return the", "This module provides", "The \"for\" statement", "If the file",
                  "Create a new", "An exception is raised when", "The default value", "Convert a"]
MAX_CHECKPOINT_MB = 25.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps (reproducible)")
    budget.add_argument("--minutes", type=float, help="training time budget; steps are derived from the first steps' time")
    m = p.add_argument_group("model")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--intermediate", type=int, default=384, help="per-expert FFN width")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--vocab", type=int, default=4096)
    m.add_argument("--max-positions", type=int, default=2048, help="max_position_embeddings written to config.json")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch", type=int, default=16, help="sequences per step")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--aux-loss-coef", type=float, default=0.02, help="router load-balancing loss weight")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: 5 times per run)")
    d = p.add_argument_group("data")
    d.add_argument("--stdlib", default=None, help="standard library directory (default: this interpreter's)")
    d.add_argument("--heldout-every", type=int, default=20, help="a document is held out if sha256(name) %% N == 0")
    d.add_argument("--max-files", type=int, default=None, help="only the first N source files (toy runs)")
    d.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the intermediate evaluations")
    d.add_argument("--trace-tokens", type=int, default=None,
                   help="held-out tokens in routing_trace.npz and the final perplexity (default: all)")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens generated per sample in the card")
    p.add_argument("--measure-only", action="store_true", help="time a few steps at these settings, print s/step, write nothing")
    return p.parse_args(argv)


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, docs, seed: int | None):
    """Documents (shuffled with seed, if given), each followed by EOS, as one token list."""
    order = list(range(len(docs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    eos = tok.token_to_id(EOS)
    encoded = tok.encode_batch([docs[i].text for i in order])
    return [t for e in encoded for t in e.ids + [eos]]


def build_model(args, vocab_size: int, eos_id: int):
    import transformers as tf
    cfg = tf.MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.max_positions,
        tie_word_embeddings=True, sliding_window=None, eos_token_id=eos_id, bos_token_id=None, pad_token_id=None,
        output_router_logits=True, router_aux_loss_coef=args.aux_loss_coef, router_jitter_noise=0.0)
    return tf.MixtralForCausalLM(cfg)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w))))


def heldout_loss(model, ids: list[int], seq_len: int, max_tokens: int | None = None) -> tuple[float, list[float]]:
    """Mean next-token cross-entropy (nats) over held-out windows of seq_len tokens, and each
    layer's smallest expert share (of tokens routed to it) on the same tokens: collapse shows early."""
    import torch
    ids = ids[:max_tokens] if max_tokens else ids
    total, count = 0.0, 0
    top_k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    routed = torch.zeros(model.config.num_hidden_layers, experts)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor([ids[start:start + seq_len + 1]])
            if chunk.shape[1] < 2:
                break
            out = model(chunk[:, :-1], output_router_logits=True, use_cache=False)
            loss = torch.nn.functional.cross_entropy(out.logits[0].float(), chunk[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + chunk.shape[1] - 1
            for layer, logits in enumerate(out.router_logits):                 # [t, E]
                routed[layer] += torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=experts)
    model.train(was_training)
    return total / count, (routed.min(dim=1).values / count).tolist()


def unigram_loss(train_ids: list[int], heldout_ids: list[int], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under add-one-smoothed training token frequencies."""
    import numpy as np
    counts = np.bincount(np.array(train_ids), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.array(heldout_ids)].mean())


def train(args, model, windows, heldout_ids, total_steps, log):
    """The training loop; returns the loss history [{step, loss, aux_loss, heldout_loss?}]."""
    import torch
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    eval_every = args.eval_every or max(1, total_steps // 5)
    history, order, cursor = [], torch.randperm(len(windows), generator=gen), 0
    model.train()
    start = time.time()
    for step in range(total_steps):
        if cursor + args.batch > len(order):    # next epoch: a new permutation from the same generator
            order, cursor = torch.randperm(len(windows), generator=gen), 0
        batch = windows[order[cursor:cursor + args.batch]]                  # [B, S]
        cursor += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        out = model(input_ids=batch, labels=batch, use_cache=False)   # HF shifts the labels: S-1 predictions per row
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        aux = out.aux_loss.item()
        ce = out.loss.item() - args.aux_loss_coef * aux
        entry = {"step": step + 1, "loss": ce, "aux_loss": aux}
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            entry["heldout_loss"], entry["min_expert_share"] = heldout_loss(model, heldout_ids, args.seq_len, args.eval_tokens)
        history.append(entry)
        if (step + 1) % args.log_every == 0 or step == 0 or "heldout_loss" in entry:
            el = time.time() - start
            log(f"step {step + 1}/{total_steps}  loss {ce:.3f}  aux {aux:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"tokens {(step + 1) * args.batch * args.seq_len}  {el:.0f}s ({el / (step + 1):.2f} s/step)"
                + (f"  held-out {entry['heldout_loss']:.3f}, smallest expert share per layer "
                   + " ".join(f"{x:.1%}" for x in entry["min_expert_share"]) if "heldout_loss" in entry else ""))
    return history, time.time() - start


def steps_for_minutes(args, model, windows, minutes: float, log) -> int:
    """Time a few steps on a copy of the model (weights untouched) and fit the budget."""
    import copy
    import torch
    probe = copy.deepcopy(model)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr)
    times = []
    for i in range(4):
        t = time.time()
        batch = windows[i * args.batch:(i + 1) * args.batch]
        out = probe(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        opt.step(), opt.zero_grad()
        times.append(time.time() - t)
    per_step = sorted(times[1:])[1] * 1.08     # median of the warm steps + ~8% for evaluations
    steps = max(1, int(minutes * 60 / per_step))
    log(f"measured {per_step:.2f} s/step ({args.batch * args.seq_len / per_step:.0f} tokens/s) → {steps} steps "
        f"in {minutes} min (rerun with --steps {steps} to reproduce)")
    return steps


def samples(model, tok, prompts, max_new_tokens: int, seed: int):
    import torch
    out = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt).ids])
        mask = torch.ones_like(ids)
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        torch.manual_seed(seed + i)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=0.8, top_k=40)
        out.append({"prompt": prompt, "greedy": tok.decode(greedy[0, ids.shape[1]:].tolist()),
                    "sampled": tok.decode(sampled[0, ids.shape[1]:].tolist())})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(f"[train_moe {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # Refuse before the slow part: an output that is in use, a model over the size budget.
    if not args.measure_only and os.path.exists(args.out) and os.listdir(args.out):
        raise SystemExit(f"train_moe: {args.out} is not empty; choose a new --out")
    n_params = parameter_count(args, args.vocab)
    size_mb = n_params * (2 if args.save_dtype == "bfloat16" else 4) / 1e6
    log(f"model: {n_params / 1e6:.2f} M parameters → {size_mb:.1f} MB in {args.save_dtype}")
    if size_mb > MAX_CHECKPOINT_MB:
        raise SystemExit(f"train_moe: {size_mb:.1f} MB exceeds the {MAX_CHECKPOINT_MB} MB budget; shrink the model")

    import numpy as np
    import torch
    import transformers as tf
    from corpus import load_corpus
    from model_card import write_card
    import routing_trace

    if not args.measure_only:
        os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    t0 = time.time()

    corpus = load_corpus(args.stdlib, args.heldout_every, args.max_files)
    stats = corpus.stats()
    log(f"corpus {stats['root']}: {stats['train_documents']} training documents ({stats['train_bytes']} bytes), "
        f"{stats['heldout_documents']} held out ({stats['heldout_bytes']} bytes), sha256 {stats['sha256'][:16]}…")
    tok = train_tokenizer([d.text for d in corpus.train], args.vocab)
    train_ids = token_stream(tok, corpus.train, args.seed)
    heldout_ids = token_stream(tok, corpus.heldout, None)
    stats.update(train_tokens=len(train_ids), heldout_tokens=len(heldout_ids), vocab_size=tok.get_vocab_size(),
                 bytes_per_token=round(stats["train_bytes"] / len(train_ids), 3))
    log(f"tokenizer: {tok.get_vocab_size()} tokens; {len(train_ids)} training tokens "
        f"({stats['bytes_per_token']} bytes/token), {len(heldout_ids)} held out")
    n_windows = len(train_ids) // args.seq_len
    if n_windows < 4 * args.batch:
        raise SystemExit(f"train_moe: {len(train_ids)} training tokens make {n_windows} windows of "
                         f"{args.seq_len}, fewer than 4 × --batch {args.batch}")
    windows = torch.tensor(train_ids[:n_windows * args.seq_len]).view(n_windows, args.seq_len)   # [N, S]

    model = build_model(args, tok.get_vocab_size(), tok.token_to_id(EOS))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == parameter_count(args, tok.get_vocab_size()), "parameter_count() is out of date"

    if args.measure_only:
        steps_for_minutes(args, model, windows, args.minutes or 30.0, log)
        return 0
    total_steps = args.steps or steps_for_minutes(args, model, windows, args.minutes, log)
    history, train_s = train(args, model, windows, heldout_ids, total_steps, log)

    model.config.output_router_logits = False   # inference: no auxiliary loss
    model.generation_config = tf.GenerationConfig(eos_token_id=tok.token_to_id(EOS), pad_token_id=tok.token_to_id(EOS),
                                                  do_sample=False, max_new_tokens=64)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                   "model_max_length": args.max_positions}, f, indent=1)

    # Measure what ships: the saved files, reloaded in float32. One pass over the held-out documents
    # (windows of seq_len, never straddling documents) gives both the routing trace and the perplexity.
    shipped = tf.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    trace = routing_trace.record(shipped, tok, [(d.name, d.text) for d in corpus.heldout], args.seq_len, args.trace_tokens)
    routing_trace.save(trace, os.path.join(args.out, "routing_trace.npz"))
    scored = ~np.isnan(trace["logprob"])
    heldout = float(-trace["logprob"][scored].mean())
    unigram = unigram_loss(train_ids, trace["token_ids"][scored].tolist(), tok.get_vocab_size())
    scored_bytes = len(tok.decode(trace["token_ids"][scored].tolist()).encode())
    log(f"held-out perplexity {math.exp(heldout):.1f} (unigram baseline {math.exp(unigram):.1f}) "
        f"over {int(scored.sum())} tokens")
    load = routing_trace.expert_load(trace["experts"], args.experts)          # [L, E]
    log("expert load max/mean per layer: " + " ".join(f"{l.max() / l.mean():.2f}" for l in load)
        + f"; smallest share {load.min():.2%}")
    if load.min() < 0.01:
        log(f"WARNING: an expert gets {load.min():.2%} of held-out tokens (< 1%): routing collapsed; "
            "do not ship this checkpoint (try a larger --aux-loss-coef)")
    with torch.no_grad():
        gens = samples(shipped, tok, SAMPLE_PROMPTS, args.sample_tokens, args.seed)

    report = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "command": "python train/train_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "reproduce": "python train/train_moe.py " + " ".join(reproduce_argv(sys.argv[1:] if argv is None else argv, total_steps)),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": tf.__version__},
        "corpus": stats, "steps": total_steps, "tokens_seen": total_steps * args.batch * args.seq_len,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
        "parameters": n_params, "active_parameters_per_token": active_parameters(model.config),
        "checkpoint_mb": round(os.path.getsize(os.path.join(args.out, "model.safetensors")) / 1e6, 2),
        "history": history,
        "heldout": {"loss": heldout, "perplexity": math.exp(heldout), "unigram_loss": unigram,
                    "unigram_perplexity": math.exp(unigram), "tokens": int(scored.sum()),
                    "bits_per_byte": heldout * int(scored.sum()) / math.log(2) / scored_bytes,
                    "unigram_bits_per_byte": unigram * int(scored.sum()) / math.log(2) / scored_bytes},
        "expert_load": {"share": load.tolist(), "tokens": int(trace["token_ids"].size),
                        "max_over_mean": [float(l.max() / l.mean()) for l in load],
                        "min_share": float(load.min())},
        "samples": gens,
    }
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_card(args.out, report)
    log(f"done in {time.time() - t0:.0f}s: {args.out}")
    return 0


def reproduce_argv(argv: list[str], steps: int) -> list[str]:
    """argv with a --minutes budget replaced by the step count it came to."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--minutes":
            out += ["--steps", str(steps)]
            skip = True
        elif a.startswith("--minutes="):
            out += ["--steps", str(steps)]
        else:
            out.append(a)
    return out


def parameter_count(args, vocab: int) -> int:
    """All parameters of build_model's model (tied embeddings counted once)."""
    h, kv = args.hidden, args.kv_heads * (args.hidden // args.heads)
    per_layer = 2 * h * h + 2 * h * kv + args.experts * (h + 3 * h * args.intermediate) + 2 * h
    return args.layers * per_layer + vocab * h + h


def active_parameters(cfg) -> int:
    """Parameters one token goes through (embedding row excluded, tied LM head counted once)."""
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + h * cfg.num_local_experts + cfg.num_experts_per_tok * 3 * h * i + 2 * h
    return cfg.num_hidden_layers * per_layer + h + cfg.vocab_size * h


if __name__ == "__main__":
    sys.exit(main())
