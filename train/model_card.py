"""The model card (README.md) and its two figures, from train_moe.py's train_report.json.

    .venv/bin/python train/model_card.py DIR      # rewrites DIR/README.md, loss_curve.png, expert_load.png

Every section is computed from the report; a report missing a number fails with the name of the
field instead of writing a card with a hole in it.
"""

from __future__ import annotations

import json
import os
import sys

SECTIONS = ["Model", "Data", "Training", "Loss curve", "Held-out perplexity", "Expert load",
            "Samples", "Routing trace", "Reproduce", "Limitations"]
REQUIRED = ["args", "command", "reproduce", "versions", "corpus", "steps", "tokens_seen", "train_seconds", "parameters",
            "active_parameters_per_token", "checkpoint_mb", "history", "heldout", "expert_load", "samples"]


def plot_loss(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    k = max(1, len(loss) // 50)     # moving average over ~2% of the run
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    evals = [(h["step"], h["heldout_loss"]) for h in history if "heldout_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, color="0.8", lw=0.8, label="training cross-entropy (per step)")
    ax.plot(steps, smooth, color="C0", lw=1.5, label=f"training, moving average of {k}")
    if evals:
        ax.plot(*zip(*evals), "o-", color="C3", label="held-out cross-entropy")
    ax.set_xlabel("step"), ax.set_ylabel("nats / token"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout(), fig.savefig(path), plt.close(fig)


def plot_expert_load(share: list[list[float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers, experts = len(share), len(share[0])
    fig, axes = plt.subplots(1, layers, figsize=(2.6 * layers, 2.8), dpi=100, sharey=True, squeeze=False)
    uniform = sum(share[0]) / experts
    for l, ax in enumerate(axes[0]):
        ax.bar(range(experts), [100 * s for s in share[l]], color="C0")
        ax.axhline(100 * uniform, color="C3", lw=1, ls="--")
        ax.set_title(f"layer {l}"), ax.set_xlabel("expert"), ax.set_xticks(range(experts))
    axes[0][0].set_ylabel("% of held-out tokens")
    fig.tight_layout(), fig.savefig(path), plt.close(fig)


def card_text(r: dict) -> str:
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise ValueError(f"train report lacks {', '.join(missing)}")
    a, c, h, e = r["args"], r["corpus"], r["heldout"], r["expert_load"]
    if not r["samples"] or not r["history"]:
        raise ValueError("train report has no samples or no loss history")
    by_source = "\n".join(f"| {k} | {v['documents']} | {v['bytes']:,} |" for k, v in c["by_source"].items())
    load_rows = "\n".join(f"| {l} | {max(s):.1%} | {min(s):.1%} | {mm:.2f} |"
                          for l, (s, mm) in enumerate(zip(e["share"], e["max_over_mean"])))
    sample_rows = "\n\n".join(f"**{s['prompt']}**\n\n- greedy: `{s['prompt']}{_inline(s['greedy'])}`\n"
                              f"- sampled (T=0.8, top-k 40): `{s['prompt']}{_inline(s['sampled'])}`" for s in r["samples"])
    last = r["history"][-1]
    return f"""# shuttle-moe-tiny

Shuttle's embedded demo model: a small Mixtral-format Mixture-of-Experts language model trained on
the English text that ships with CPython, so that `shuttle serve` and `shuttle run` answer with
text and route tokens the way a trained router does. Trained by `train/train_moe.py`.

## Model

| | |
|---|---|
| architecture | `MixtralForCausalLM`, {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads ({a['kv_heads']} KV heads) |
| experts | {a['experts']} per layer, top-{a['top_k']}, expert FFN width {a['intermediate']} |
| vocabulary | {c['vocab_size']} tokens, byte-level BPE (`tokenizer.json`), `<|endoftext|>` ends a document |
| parameters | {r['parameters'] / 1e6:.2f} M in all, {r['active_parameters_per_token'] / 1e6:.2f} M active per token (tied embeddings) |
| checkpoint | `model.safetensors`, {a['save_dtype']}, {r['checkpoint_mb']} MB |

## Data

CPython {r['versions']['python']}'s standard library (`{c['root']}`): every module, class and
function docstring, the language reference in `pydoc_data/topics.py`, and the `.txt`/`.rst`
files; test directories, `site-packages` and grammar files excluded (`train/corpus.py`). A
document is held out when `sha256(name) % {a['heldout_every']} == 0`.

| source | documents | bytes |
|---|---|---|
{by_source}

Training split: {c['train_documents']} documents, {c['train_bytes']:,} bytes, {c['train_tokens']:,} tokens
({c['bytes_per_token']} bytes/token). Held out: {c['heldout_documents']} documents, {c['heldout_bytes']:,} bytes,
{c['heldout_tokens']:,} tokens. Corpus sha256 `{c['sha256']}`.

## Training

{r['steps']} steps of {a['batch']} × {a['seq_len']} tokens = {r['tokens_seen']:,} tokens seen
({r['tokens_seen'] / c['train_tokens']:.2f} epochs), AdamW (β 0.9/0.95, weight decay {a['weight_decay']}),
peak learning rate {a['lr']} after {a['warmup']:.0%} linear warm-up, cosine decay to 10%, gradient
clip 1.0, router load-balancing loss × {a['aux_loss_coef']}, seed {a['seed']}, {a['threads']} threads,
float32. {r['train_seconds'] / 60:.1f} minutes of training (torch {r['versions']['torch']},
transformers {r['versions']['transformers']}). Final step: cross-entropy {last['loss']:.3f}, auxiliary loss {last['aux_loss']:.3f}.

## Loss curve

![loss curve](loss_curve.png)

## Held-out perplexity

Measured on the saved checkpoint, reloaded in float32, over all {h['tokens']:,} held-out tokens in
windows of {a['seq_len']}:

| | nats/token | perplexity | bits/byte |
|---|---|---|---|
| this model | {h['loss']:.3f} | {h['perplexity']:.1f} | {h['bits_per_byte']:.3f} |
| unigram baseline (training token frequencies, add-one) | {h['unigram_loss']:.3f} | {h['unigram_perplexity']:.1f} | {h['unigram_bits_per_byte']:.3f} |

## Expert load

Share of held-out tokens ({e['tokens']:,}) routed to each expert (a token counts once for each of
its {a['top_k']} experts; a uniform router gives {a['top_k'] / a['experts']:.1%} to every expert, the dashed line).

![expert load](expert_load.png)

| layer | largest share | smallest share | max / mean |
|---|---|---|---|
{load_rows}

Smallest share of any expert in any layer: {e['min_share']:.1%}.

## Samples

The first {a['sample_tokens']} tokens after each prompt, from the shipped weights.

{sample_rows}

## Routing trace

`routing_trace.npz`: per layer and per held-out token, the chosen experts and their weights
({e['tokens']:,} tokens; format in `train/routing_trace.py`). Re-record with
`python train/routing_trace.py --model DIR --out trace.npz`.

## Reproduce

Trained with

```
{r['command']}
```

which came to {r['steps']} steps; the same corpus sha256 and thread count give the same weights with

```
{r['reproduce']}
```

## Limitations

A {r['parameters'] / 1e6:.0f} M-parameter model trained for {r['train_seconds'] / 60:.0f} minutes on
{c['train_bytes'] / 1e6:.1f} MB of Python documentation: it writes docstring-flavoured English, not
facts. It is a demo and a routing workload for Shuttle, not an assistant.
"""


def _inline(text: str) -> str:
    return text.replace("`", "'").replace("\n", " ⏎ ")


def write_card(out_dir: str, report: dict) -> str:
    text = card_text(report)
    plot_loss(report["history"], os.path.join(out_dir, "loss_curve.png"))
    plot_expert_load(report["expert_load"]["share"], os.path.join(out_dir, "expert_load.png"))
    path = os.path.join(out_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: model_card.py DIR   (DIR holds train_report.json)")
    with open(os.path.join(argv[0], "train_report.json")) as f:
        print(write_card(argv[0], json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
