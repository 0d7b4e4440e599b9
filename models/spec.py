"""One normalized description of a Mixture-of-Experts checkpoint, whatever its family.

Glossary
- family: the Hugging Face `model_type` we map from (mixtral, qwen2_moe, qwen3_moe).
- moe layer: a decoder layer whose FFN is routed experts (plus, in Qwen2-MoE, a shared expert);
  the other layers run a dense FFN on the attention rank (`mlp_only_layers`).
- shared expert: a dense FFN every token goes through, scaled by sigmoid(shared_expert_gate · x).

`ModelSpec` is frozen and validated at construction; it is the only thing the ranks know about the
model besides the weights, and it crosses process boundaries (it pickles as plain data).
This module is the one reader of config.json and imports no torch: the tuner builds its
`ModelShape` from a `ModelSpec` too, so the loader and the tuner cannot read a model differently.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace


class CheckpointError(ValueError):
    """A checkpoint directory or config that Shuttle cannot serve; the message names what is wrong."""


SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    # One bool per layer: True where the FFN is routed experts.
    moe_layers: tuple[bool, ...]
    dense_intermediate_size: int = 0  # FFN width of the non-MoE layers (0: there are none)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    qkv_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise CheckpointError(f"model_type {self.family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "num_experts", "top_k", "moe_intermediate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise CheckpointError(f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.num_experts})")
        if len(self.moe_layers) != self.num_layers:
            raise CheckpointError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if not all(self.moe_layers) and self.dense_intermediate_size <= 0:
            raise CheckpointError("some layers are dense (mlp_only_layers) but intermediate_size is not set")
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")

    @functools.cached_property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    def bytes_per_expert(self, dtype_bytes: int) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size * dtype_bytes


def _first(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"rope type {rope_type!r} is not supported (only default RoPE)")
    return float(_first(params, "rope_theta", default=_first(cfg, "rope_theta", default=10000.0)))


def spec_from_config(cfg: dict) -> ModelSpec:
    """Map a Hugging Face `config.json` dict to a ModelSpec (errors name the offending field)."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(f"config.json model_type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    n_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", family == "mixtral"):
        raise CheckpointError(f"sliding_window={cfg['sliding_window']} is not supported (full attention only)")
    experts_from = ("num_local_experts",) if family == "mixtral" else ("num_experts", "num_local_experts")
    n_experts = int(_first(cfg, *experts_from, default=0))
    if n_experts <= 0:
        raise CheckpointError(f"config.json names no experts ({' / '.join(experts_from)}): not a MoE model")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    common = dict(
        family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
        top_k=int(cfg["num_experts_per_tok"]), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg), max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"), torch_dtype=str(_first(cfg, "dtype", "torch_dtype", default="float32")),
        hidden_act=cfg.get("hidden_act", "silu"),
    )
    if family == "mixtral":
        return ModelSpec(**common, num_experts=n_experts,
                         moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True,
                         moe_layers=(True,) * n_layers)
    # qwen2_moe / qwen3_moe: sparse every `decoder_sparse_step` layers, except mlp_only_layers.
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    moe_layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(n_layers))
    return ModelSpec(
        **common, num_experts=n_experts, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=moe_layers,
        dense_intermediate_size=int(cfg.get("intermediate_size") or 0),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0,
        qkv_bias=bool(cfg.get("qkv_bias", True)) if family == "qwen2_moe" else bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3_moe",
    )


def load_spec(model_dir: str) -> ModelSpec:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir!r} has no config.json")
    with open(path) as f:
        cfg = json.load(f)
    try:
        spec = spec_from_config(cfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing required field {e.args[0]!r}") from None
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):  # generation_config's eos ids win, as in transformers' generate
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            spec = replace(spec, eos_token_ids=ids)
    return spec


__all__ = ["ModelSpec", "CheckpointError", "spec_from_config", "load_spec", "SUPPORTED_FAMILIES"]
