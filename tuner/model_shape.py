"""A MoE model's dimensions as the cost model needs them: the tuner's view of a `ModelSpec`.

A checkpoint's config.json is read by the loader's reader (`models.spec`, torch-free) and reduced
here, so the tuner and the ranks cannot disagree about a model. `ModelShape` also stands for models
that are not on disk: `PRESETS` holds MegaScale-Infer-sized models for worked examples.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from models.spec import ModelSpec, load_spec


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate: int          # one routed expert's FFN width
    vocab_size: int
    shared_intermediate: int = 0      # shared expert / dense FFN on MoE layers, run on attention ranks
    dense_layers: int = 0             # layers with a dense FFN instead of experts (mlp_only_layers)
    dense_intermediate: int = 0

    # ---- parameter counts (elements) ---------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        """q, k, v, o, router, norms and the shared expert: what an attention rank holds per layer."""
        H, d = self.hidden_size, self.head_dim
        qkvo = H * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * H
        return qkvo + self.num_experts * H + 2 * H + 3 * H * self.shared_intermediate

    @property
    def expert_params(self) -> int:
        """One routed expert of one layer (gate, up, down)."""
        return 3 * self.hidden_size * self.expert_intermediate

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers

    def attention_params(self) -> int:
        """Everything an attention rank holds: all layers' attention side, dense FFNs, embeddings, LM head."""
        dense = self.dense_layers * 3 * self.hidden_size * self.dense_intermediate
        return self.num_layers * self.attention_params_per_layer + dense + 2 * self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        return self.attention_params() + self.moe_layers * self.num_experts * self.expert_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes one token of context costs, over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        return cls(**d)

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str = "model") -> "ModelShape":
        dense = spec.moe_layers.count(False)
        return cls(name=name, num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                   num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, num_experts=spec.num_experts, top_k=spec.top_k,
                   expert_intermediate=spec.moe_intermediate_size, vocab_size=spec.vocab_size,
                   shared_intermediate=spec.shared_expert_intermediate_size, dense_layers=dense,
                   dense_intermediate=spec.dense_intermediate_size if dense else 0)

    @classmethod
    def from_model_dir(cls, path: str) -> "ModelShape":
        return cls.from_spec(load_spec(path), name=os.path.basename(os.path.normpath(path)))


# Models of the size MegaScale-Infer evaluates (132B-317B parameters), for plans without a checkpoint.
PRESETS = {
    # DBRX: 132B total, 16 experts top-4 (its published config)
    "dbrx-132b": ModelShape("dbrx-132b", num_layers=40, hidden_size=6144, num_heads=48, num_kv_heads=8, head_dim=128,
                            num_experts=16, top_k=4, expert_intermediate=10752, vocab_size=100352),
    # Mixtral-8x22B: 141B total, 8 experts top-2
    "mixtral-8x22b": ModelShape("mixtral-8x22b", num_layers=56, hidden_size=6144, num_heads=48, num_kv_heads=8,
                                head_dim=128, num_experts=8, top_k=2, expert_intermediate=16384, vocab_size=32768),
    # a DBRX-style model scaled to ~317B: 32 experts top-4, 48 layers
    "scaled-moe-317b": ModelShape("scaled-moe-317b", num_layers=48, hidden_size=6144, num_heads=48, num_kv_heads=8,
                                  head_dim=128, num_experts=32, top_k=4, expert_intermediate=10944, vocab_size=100352),
}


def resolve_model(name_or_dir: str) -> ModelShape:
    """A preset name or a checkpoint directory."""
    if name_or_dir in PRESETS:
        return PRESETS[name_or_dir]
    if os.path.isdir(name_or_dir):
        return ModelShape.from_model_dir(name_or_dir)
    raise ValueError(f"model {name_or_dir!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
