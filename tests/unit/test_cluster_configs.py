"""The shipped `ray up` configs: valid for Ray's own schema, installing Shuttle the README's way, and
(for the cloud one) declaring roles that put attention and experts where they belong."""

import os

import pytest
import yaml

from cluster.inventory import NodeInventory
from cluster.roles import plan_layout

CLUSTER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")


def load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml"])
def test_valid_for_ray_and_installs_like_the_readme(name):
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = load(name)
    validate_config(prepare_config(load(name)))          # Ray's JSON schema: unknown or misspelt keys fail
    assert any("./dev shuttle" in c for c in raw["setup_commands"])
    assert any("shuttle_env" in c and ".bashrc" in c for c in raw["setup_commands"])   # ray down's login shell
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts and all("/.venv/bin/ray start" in c and "RAY_AUTH_MODE=disabled" in c for c in starts)


def test_local_yaml_keeps_its_placeholders():
    text = open(os.path.join(CLUSTER, "local.yaml")).read()
    for placeholder in ("HEAD_IP", "WORKER_IP_1", "SSH_USER", "SSH_KEY", "SHUTTLE_DIR"):
        assert placeholder in text


def test_aws_node_types_put_attention_on_h100_and_experts_on_l40s():
    types = load("aws.yaml")["available_node_types"]
    assert types["attention"]["node_config"]["InstanceType"] == "p5.48xlarge"       # 8 x H100
    assert types["expert"]["node_config"]["InstanceType"] == "g6e.12xlarge"         # 4 x L40S
    nodes = [NodeInventory("head", "10.0.0.1", "head", 8, 0, is_head=True)]
    nodes.append(NodeInventory("att", "10.0.0.2", "att", 192, 8, attention_slots=types["attention"]["resources"]["shuttle_attention"]))
    for i in range(types["expert"]["min_workers"]):
        nodes.append(NodeInventory(f"exp{i}", f"10.0.0.{3 + i}", "exp", 48, 4,
                                   expert_slots=types["expert"]["resources"]["shuttle_expert"]))
    layout = plan_layout(nodes, 8, 8)
    assert layout.mode == "declared" and layout.roles["head"] == "-"
    assert set(layout.attention_nodes) == {"att"} and set(layout.expert_nodes) == {"exp0", "exp1"}
    assert (layout.device, layout.backend, layout.gpus_per_rank) == ("cuda", "nccl", 1.0)
