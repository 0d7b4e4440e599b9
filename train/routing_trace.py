"""Record which experts a Mixtral-format checkpoint routes each held-out token to, per layer.

    .venv/bin/python train/routing_trace.py --model DIR --out trace.npz [--max-tokens N]
                                            [--text-file FILE | --heldout-every 20] [--window 512]

The text is the held-out part of the training corpus (train/corpus.py, the same hash split) unless
--text-file is given. Each document is tokenized with DIR/tokenizer.json, cut into windows of
--window tokens, and every window is run through transformers' model on its own (so a token's
routing sees at most --window tokens of context). The router is replayed exactly as Mixtral's:
softmax over the router logits in float32, top-k, weights renormalised to sum to 1.

File format (numpy .npz, `np.load(path)`; letters: L layers, T tokens, K experts per token):

| array | dtype, shape | meaning |
|---|---|---|
| `token_ids` | int32 [T] | the token at each position, documents concatenated |
| `document` | int32 [T] | index of the token's document (into `meta["documents"]`) |
| `window` | int32 [T] | index of the window it was run in (windows never straddle documents) |
| `position` | int32 [T] | position inside that window (0 = first token of a window) |
| `experts` | int16 [L, T, K] | chosen experts, best first |
| `weights` | float32 [L, T, K] | their renormalised router weights (sum to 1 over K) |
| `logprob` | float32 [T] | the model's log-probability of the token given its window so far (NaN at position 0) |
| `meta` | 0-d str | JSON: format version, model dir, num_experts, top_k, window, documents (names) |

Replaying expert loads: `np.bincount(experts[l].ravel(), minlength=num_experts)` is layer l's
per-expert token count; slicing by `window` gives one forward pass's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FORMAT_VERSION = 1


def route(model, windows: list[list[int]]):
    """[(experts [L, t, K], weights [L, t, K], logprob [t])] per window, from one forward pass each."""
    import torch
    top_k = model.config.num_experts_per_tok
    out = []
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            result = model(x, output_router_logits=True, use_cache=False)
            probs = torch.stack([r.float() for r in result.router_logits]).softmax(dim=-1)   # [L, t, E]
            weights, experts = probs.topk(top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            logprob = torch.full((len(ids),), float("nan"))
            logprob[1:] = result.logits[0, :-1].float().log_softmax(-1).gather(1, x[0, 1:, None])[:, 0]
            out.append((experts.to(torch.int16).numpy(), weights.numpy().astype(np.float32), logprob.numpy()))
    return out


def record(model, tokenizer, docs: list[tuple[str, str]], window: int, max_tokens: int | None) -> dict:
    """The trace arrays (format above) for docs [(name, text)], stopping after max_tokens tokens."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    token_ids, document, window_index, position, windows = [], [], [], [], []
    names = []
    for d, (name, text) in enumerate(docs):
        ids = tokenizer.encode(text).ids + ([eos] if eos is not None else [])
        if max_tokens is not None:
            ids = ids[:max_tokens - len(token_ids)]
        if not ids:
            break
        names.append(name)
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            token_ids += chunk
            document += [d] * len(chunk)
            window_index += [len(windows)] * len(chunk)
            position += range(len(chunk))
            windows.append(chunk)
        if max_tokens is not None and len(token_ids) >= max_tokens:
            break
    if not windows:
        raise ValueError("no text to trace")
    routed = route(model, windows)
    meta = {"format_version": FORMAT_VERSION, "num_experts": model.config.num_local_experts,
            "top_k": model.config.num_experts_per_tok, "num_layers": model.config.num_hidden_layers,
            "window": window, "documents": names}
    return {"token_ids": np.array(token_ids, np.int32), "document": np.array(document, np.int32),
            "window": np.array(window_index, np.int32), "position": np.array(position, np.int32),
            "experts": np.concatenate([r[0] for r in routed], axis=1),
            "weights": np.concatenate([r[1] for r in routed], axis=1),
            "logprob": np.concatenate([r[2] for r in routed]).astype(np.float32),
            "meta": np.array(json.dumps(meta))}


def save(trace: dict, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **trace)
    os.replace(tmp, path)


def load(path: str) -> tuple[dict, dict]:
    """(arrays, meta) of a trace file, checking the format version."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: routing trace format {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    return arrays, meta


def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of tokens routed to each expert (each token counts once per chosen expert)."""
    tokens = experts.shape[1]
    return np.stack([np.bincount(e.ravel().astype(np.int64), minlength=num_experts) / tokens for e in experts])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--text-file", default=None, help="trace this UTF-8 file (one document) instead of the held-out corpus")
    p.add_argument("--heldout-every", type=int, default=20, help="the corpus split (must match training)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    args = p.parse_args(argv)
    import torch
    import transformers
    transformers.logging.disable_progress_bar()
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok_path = os.path.join(args.model, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise SystemExit(f"routing_trace: {tok_path} is missing (the trace tokenizes text)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            docs = [(os.path.basename(args.text_file), f.read())]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from corpus import load_corpus
        docs = [(d.name, d.text) for d in load_corpus(heldout_every=args.heldout_every).heldout]
    trace = record(model, Tokenizer.from_file(tok_path), docs, args.window, args.max_tokens)
    save(trace, args.out)
    load_ = expert_load(trace["experts"], model.config.num_local_experts)
    print(json.dumps({"out": args.out, "tokens": int(trace["token_ids"].size),
                      "heldout_loss": round(float(-np.nanmean(trace["logprob"])), 4),
                      "max_over_mean_load": [round(float(l.max() / l.mean()), 3) for l in load_],
                      "min_share": [round(float(l.min()), 4) for l in load_]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
