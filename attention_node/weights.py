"""The attention rank's share of the weights: everything except the routed experts.

Legend: H hidden, V vocab, h query heads, g KV heads, d head dim, E experts, Is shared-expert width,
Id dense-FFN width. q, k and v projections are fused into one [(h + 2g)·d, H] matrix (one GEMM);
gate and up projections into one [2I, H] matrix. Matrices are held as `models.linear.Linear`
(prepacked for the CPU where that is faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.checkpoint import CheckpointReader, moe_prefix
from models.linear import Linear, pack_screen
from models.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor            # [H]
    post_norm: torch.Tensor             # [H]
    qkv: Linear                         # [(h + 2g)·d, H] (+ bias in Qwen2-MoE)
    o: Linear                           # [H, h·d]
    q_norm: torch.Tensor | None         # [d] (Qwen3)
    k_norm: torch.Tensor | None         # [d]
    router: Linear | None               # [E, H] on MoE layers
    ffn_up: Linear | None               # gate+up: shared expert [2Is, H] on MoE layers, dense FFN [2Id, H] otherwise
    ffn_down: Linear | None             # [H, Is] or [H, Id]
    shared_gate: Linear | None          # [1, H] (Qwen2-MoE)


@dataclass
class AttentionWeights:
    embed: torch.Tensor                 # [V, H]
    final_norm: torch.Tensor            # [H]
    lm_head: Linear                     # [V, H]
    layers: list[LayerWeights]
    lm_screen: tuple[torch.Tensor, torch.Tensor] | None = None   # the head's int8 screen (models/linear.py: pack_screen)


def load_attention_weights(spec: ModelSpec, reader: CheckpointReader, dtype: torch.dtype,
                           device: torch.device) -> AttentionWeights:
    def get(name: str) -> torch.Tensor:
        return reader.get(name, dtype).to(device)

    def linear(*names: str, bias: tuple[str, ...] = ()) -> Linear:
        """One Linear over the named matrices stacked by rows (q|k|v, gate|up)."""
        return Linear(torch.cat([get(n) for n in names]), torch.cat([get(n) for n in bias]) if bias else None)

    def mlp(prefix: str) -> tuple[Linear, Linear]:
        return linear(f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"), linear(f"{prefix}.down_proj.weight")

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        attn = f"{p}.self_attn"
        router = ffn_up = ffn_down = shared_gate = None
        if spec.moe_layers[i]:
            moe = moe_prefix(spec, reader, i)
            router = linear(f"{moe}.gate.weight")
            if spec.shared_expert_intermediate_size:
                ffn_up, ffn_down = mlp(f"{moe}.shared_expert")
                shared_gate = linear(f"{moe}.shared_expert_gate.weight")
        else:
            ffn_up, ffn_down = mlp(f"{p}.mlp")
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight"),
            post_norm=get(f"{p}.post_attention_layernorm.weight"),
            qkv=linear(*[f"{attn}.{n}_proj.weight" for n in "qkv"],
                       bias=tuple(f"{attn}.{n}_proj.bias" for n in "qkv") if spec.qkv_bias else ()),
            o=linear(f"{attn}.o_proj.weight"),
            q_norm=get(f"{attn}.q_norm.weight") if spec.qk_norm else None,
            k_norm=get(f"{attn}.k_norm.weight") if spec.qk_norm else None,
            router=router, ffn_up=ffn_up, ffn_down=ffn_down, shared_gate=shared_gate,
        ))
    embed = get("model.embed_tokens.weight")
    tied = spec.tie_word_embeddings or not reader.has("lm_head.weight")
    head = embed if tied else get("lm_head.weight")
    lm_head = Linear(head)
    screen = pack_screen(head) if lm_head.panels is not None else None
    return AttentionWeights(embed=embed, final_norm=get("model.norm.weight"), lm_head=lm_head, layers=layers,
                            lm_screen=screen)
