"""The loader: one spec per family, lazy per-rank reads, both expert layouts, sharding, dtypes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention_node.weights import load_attention_weights
from expert_node.experts import ExpertShard
from models.checkpoint import CheckpointReader, read_expert
from models.spec import CheckpointError, load_spec


def test_spec_per_family(tiny_model):
    mix = load_spec(tiny_model("mixtral"))
    assert (mix.family, mix.num_experts, mix.top_k, mix.norm_topk_prob) == ("mixtral", 8, 2, True)
    assert mix.moe_layers == (True, True, True) and mix.shared_expert_intermediate_size == 0
    q2 = load_spec(tiny_model("qwen2_moe"))
    assert q2.moe_layers == (True, False, True)          # mlp_only_layers=[1]
    assert q2.shared_expert_intermediate_size == 80 and q2.qkv_bias and not q2.norm_topk_prob
    q3 = load_spec(tiny_model("qwen3_moe"))
    assert q3.qk_norm and q3.head_dim == 24 and q3.norm_topk_prob and not q3.qkv_bias


def test_expert_rank_reads_only_its_experts(tiny_model):
    d = tiny_model("mixtral")
    spec = load_spec(d)
    reader = CheckpointReader(d)
    ExpertShard.load(spec, reader, [3, 4, 5], torch.float32, torch.device("cpu"))
    experts_touched = {int(n.split(".experts.")[1].split(".")[0]) for n in reader.names_read}
    assert experts_touched == {3, 4, 5}
    assert all(".experts." in n for n in reader.names_read)     # no attention weights either
    assert len(reader.names_read) == 3 * 3 * spec.num_layers


def test_attention_rank_reads_no_expert(tiny_model):
    d = tiny_model("qwen2_moe")
    reader = CheckpointReader(d)
    load_attention_weights(load_spec(d), reader, torch.float32, torch.device("cpu"))
    assert not [n for n in reader.names_read if ".experts." in n]
    assert any("shared_expert_gate" in n for n in reader.names_read)


def _fuse(src: str, dst: str, family: str) -> None:
    """Rewrite a per-expert checkpoint into the fused gate_up_proj/down_proj layout, in two shards."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out, experts = {}, {}
    for name, t in tensors.items():
        if ".experts." in name:
            prefix, rest = name.split(".experts.")
            e, kind = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = t
        else:
            out[name] = t
    for prefix, by_e in experts.items():
        ids = sorted(by_e)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([by_e[e][gate], by_e[e][up]]) for e in ids])
        out[f"{prefix}.experts.down_proj"] = torch.stack([by_e[e][down] for e in ids])
    os.makedirs(dst)
    names = sorted(out)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: out[n].contiguous() for n in part}, os.path.join(dst, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_sharded_layout_loads_the_same_experts(tiny_model, tmp_path, family):
    src = tiny_model(family)
    dst = str(tmp_path / "fused")
    _fuse(src, dst, family)
    spec = load_spec(dst)
    a, b = CheckpointReader(src), CheckpointReader(dst)
    layer = spec.moe_layer_ids[-1]
    for e in (0, 5):
        wa, wb = read_expert(spec, a, layer, e, torch.float32), read_expert(spec, b, layer, e, torch.float32)
        assert torch.equal(wa[0], wb[0]) and torch.equal(wa[1], wb[1])
    assert all("[" in n for n in b.names_read)     # sliced reads of the stacked tensors, not whole tensors


def test_bfloat16_load(tiny_model):
    d = tiny_model("mixtral")
    shard = ExpertShard.load(load_spec(d), CheckpointReader(d), [0], torch.bfloat16, torch.device("cpu"))
    lin = shard.up[0][0]
    held = lin.panels if lin.panels is not None else lin.weight     # bfloat16 panels where the CPU has AVX-512 BF16
    assert held.dtype == torch.bfloat16 and lin.packed is None


def test_bad_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_spec(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="missing required field 'hidden_size'"):
        load_spec(str(tmp_path))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(str(tmp_path))
