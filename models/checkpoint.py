"""Read the tensors a rank owns from a Hugging Face safetensors checkpoint, lazily.

A checkpoint is `config.json` plus one or more `*.safetensors` files (sharded checkpoints carry a
`model.safetensors.index.json`). Only file headers are read up front; each tensor (or, for a fused
expert tensor, each expert's slice of it) is read on request, so an expert rank never pulls another
rank's experts into memory.

Expert weights come in two layouts:
- per expert (what `save_pretrained` writes):  `<moe>.experts.{e}.w1|w3|w2.weight` (Mixtral) or
  `<moe>.experts.{e}.gate_proj|up_proj|down_proj.weight` (Qwen);
- fused: `<moe>.experts.gate_up_proj` [E, 2I, H] and `<moe>.experts.down_proj` [E, H, I].
`<moe>` is `model.layers.{l}.block_sparse_moe` (Mixtral) or `model.layers.{l}.mlp`.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open

from models.spec import CheckpointError, ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


class CheckpointReader:
    """Name → file index over a checkpoint directory; reads tensors one at a time."""

    def __init__(self, model_dir: str):
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        else:
            files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
            if not files:
                raise CheckpointError(f"{model_dir!r} has no *.safetensors files")
            self._file_of = {}
            for path in files:
                with safe_open(path, "pt") as f:
                    self._file_of.update({k: path for k in f.keys()})
        self._handles: dict[str, object] = {}
        self.names_read: list[str] = []  # every tensor this reader touched, for tests and logs

    def has(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        self.names_read.append(name)
        return self._handle(name).get_tensor(name).to(dtype)

    def get_rows(self, name: str, index: int, dtype: torch.dtype) -> torch.Tensor:
        """`tensor[index]` of a stacked tensor, reading only that slice."""
        self.names_read.append(f"{name}[{index}]")
        return self._handle(name).get_slice(name)[index].to(dtype)

    def close(self) -> None:
        self._handles.clear()


def moe_prefix(spec: ModelSpec, reader: CheckpointReader, layer: int) -> str:
    """Where a layer's router and experts live (Mixtral checkpoints use either name)."""
    for prefix in (f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"):
        if reader.has(f"{prefix}.gate.weight"):
            return prefix
    raise CheckpointError(f"checkpoint has no router for MoE layer {layer} (looked for model.layers.{layer}.block_sparse_moe.gate.weight and model.layers.{layer}.mlp.gate.weight)")


_PER_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                     "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def read_expert(spec: ModelSpec, reader: CheckpointReader, layer: int, expert: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's weights: (w13 [2I, H] = gate rows then up rows, w2 [H, I])."""
    prefix = moe_prefix(spec, reader, layer) + ".experts"
    gate_name, up_name, down_name = _PER_EXPERT_NAMES[spec.family]
    if reader.has(f"{prefix}.{expert}.{gate_name}.weight"):
        gate = reader.get(f"{prefix}.{expert}.{gate_name}.weight", dtype)
        up = reader.get(f"{prefix}.{expert}.{up_name}.weight", dtype)
        down = reader.get(f"{prefix}.{expert}.{down_name}.weight", dtype)
        return torch.cat([gate, up], dim=0), down
    for suffix in ("", ".weight"):
        if reader.has(f"{prefix}.gate_up_proj{suffix}"):
            w13 = reader.get_rows(f"{prefix}.gate_up_proj{suffix}", expert, dtype)
            w2 = reader.get_rows(f"{prefix}.down_proj{suffix}", expert, dtype)
            return w13, w2
    raise CheckpointError(f"checkpoint has no weights for expert {expert} of layer {layer} (neither {prefix}.{expert}.{gate_name}.weight nor {prefix}.gate_up_proj)")
