"""Tiny random-weight MoE checkpoints built from transformers config classes, and HF references.

The checkpoints go through `save_pretrained`, so Shuttle loads them the way it loads real ones.
"""

from __future__ import annotations

import os

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def build_tiny(family: str, out_dir: str, seed: int = 0, **overrides) -> str:
    import transformers as tf
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=2,
                  eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "num_local_experts": 8, "intermediate_size": 96, **overrides})
        model_cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**{**common, "num_experts": 8, "moe_intermediate_size": 48,
                                   "shared_expert_intermediate_size": 80, "intermediate_size": 112,
                                   "mlp_only_layers": [1], "norm_topk_prob": False, **overrides})
        model_cls = tf.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{**common, "num_experts": 8, "moe_intermediate_size": 48,
                                   "intermediate_size": 112, "norm_topk_prob": True, "head_dim": 24, **overrides})
        model_cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # HF inits some weights to zero or tiny; spread them so routing and norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, 0.15 if "gate" in name and "proj" not in name else 0.08)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def hf_generate(model_dir: str, prompts: list[list[int]], max_new_tokens: int):
    """Greedy tokens from HF `generate`, and the logits at each generated position (teacher-forced)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            # An explicit mask: otherwise generate() masks prompt tokens equal to the pad id.
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            gen = out[0, len(p):].tolist()
            full = model(out).logits[0]                       # [len, V]
            tokens.append(gen)
            logits.append(full[len(p) - 1: len(p) - 1 + len(gen)])
    return tokens, logits
