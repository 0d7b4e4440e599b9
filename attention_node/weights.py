"""The attention rank's share of the weights: everything except the routed experts.

Legend: H hidden, V vocab, h query heads, g KV heads, d head dim, E experts, Is shared-expert width,
Id dense-FFN width. q, k and v projections are fused into one [(h + 2g)·d, H] matrix (one GEMM);
gate and up projections into one [2I, H] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.checkpoint import CheckpointReader, moe_prefix
from models.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor            # [H]
    post_norm: torch.Tensor             # [H]
    wqkv: torch.Tensor                  # [(h + 2g)·d, H]
    bqkv: torch.Tensor | None           # [(h + 2g)·d]
    wo: torch.Tensor                    # [H, h·d]
    q_norm: torch.Tensor | None         # [d] (Qwen3)
    k_norm: torch.Tensor | None         # [d]
    router: torch.Tensor | None         # [E, H] on MoE layers
    ffn_w13: torch.Tensor | None        # shared expert [2Is, H] on MoE layers, dense FFN [2Id, H] otherwise
    ffn_w2: torch.Tensor | None         # [H, Is] or [H, Id]
    shared_gate: torch.Tensor | None    # [1, H] (Qwen2-MoE)


@dataclass
class AttentionWeights:
    embed: torch.Tensor                 # [V, H]
    final_norm: torch.Tensor            # [H]
    lm_head: torch.Tensor               # [V, H]
    layers: list[LayerWeights]


def _mlp(reader: CheckpointReader, prefix: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.cat([reader.get(f"{prefix}.gate_proj.weight", dtype), reader.get(f"{prefix}.up_proj.weight", dtype)])
    return w13, reader.get(f"{prefix}.down_proj.weight", dtype)


def load_attention_weights(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                           device: torch.device) -> AttentionWeights:
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        attn = f"{p}.self_attn"
        wqkv = torch.cat([reader.get(f"{attn}.{n}_proj.weight", dtype) for n in "qkv"])
        bqkv = torch.cat([reader.get(f"{attn}.{n}_proj.bias", dtype) for n in "qkv"]) if spec.qkv_bias else None
        router = ffn_w13 = ffn_w2 = shared_gate = None
        if spec.moe_layers[i]:
            moe = moe_prefix(spec, reader, i)
            router = reader.get(f"{moe}.gate.weight", dtype)
            if spec.shared_expert_intermediate_size:
                ffn_w13, ffn_w2 = _mlp(reader, f"{moe}.shared_expert", dtype)
                shared_gate = reader.get(f"{moe}.shared_expert_gate.weight", dtype)
        else:
            ffn_w13, ffn_w2 = _mlp(reader, f"{p}.mlp", dtype)
        layers.append(LayerWeights(
            input_norm=reader.get(f"{p}.input_layernorm.weight", dtype),
            post_norm=reader.get(f"{p}.post_attention_layernorm.weight", dtype),
            wqkv=wqkv, bqkv=bqkv, wo=reader.get(f"{attn}.o_proj.weight", dtype),
            q_norm=reader.get(f"{attn}.q_norm.weight", dtype) if spec.qk_norm else None,
            k_norm=reader.get(f"{attn}.k_norm.weight", dtype) if spec.qk_norm else None,
            router=router, ffn_w13=ffn_w13, ffn_w2=ffn_w2, shared_gate=shared_gate,
        ))
    embed = reader.get("model.embed_tokens.weight", dtype)
    if spec.tie_word_embeddings or not reader.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = reader.get("lm_head.weight", dtype)
    weights = AttentionWeights(embed=embed, final_norm=reader.get("model.norm.weight", dtype), lm_head=lm_head, layers=layers)
    if device.type != "cpu":
        weights = _to_device(weights, device)
    return weights


def _to_device(w: AttentionWeights, device: torch.device) -> AttentionWeights:
    def mv(t):
        return None if t is None else t.to(device)
    layers = [LayerWeights(**{k: mv(v) for k, v in vars(layer).items()}) for layer in w.layers]
    return AttentionWeights(embed=mv(w.embed), final_norm=mv(w.final_norm), lm_head=mv(w.lm_head), layers=layers)
