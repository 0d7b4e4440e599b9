"""What each rank's process is told about the network: its node's route, not the driver's settings."""

import pytest

from cluster.deployment import DeploymentError, _rank_env, node_threads
from cluster.inventory import NodeInventory
from cluster.roles import plan_layout
from scheduler.config import EngineConfig


def node(ip, ifname="eth1", error=None, cpus=8.0, **slots):
    return NodeInventory(node_id=f"id-{ip}", address=ip, hostname=f"h-{ip}", cpus=cpus, gpu_slots=0.0,
                         route_ifname=None if error else ifname, route_source=None if error else ip,
                         route_error=error, **slots)


def test_cluster_ranks_listen_on_their_route_to_the_rendezvous(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")           # the driver's own (loopback) setting
    env = _rank_env(node("10.1.0.2", "ens5"), "10.1.0.1", cluster=True)
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "ens5"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env
    assert env["RAY_AUTH_MODE"] == "disabled"


def test_private_ray_stays_on_loopback(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    env = _rank_env(node("127.0.0.1"), "127.0.0.1", cluster=False)
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"


def test_a_node_without_a_route_is_named():
    with pytest.raises(DeploymentError, match=r"node 10.1.0.3 \(h-10.1.0.3\) has no route to the rendezvous host "
                                              r"10.1.0.1: OSError: Network is unreachable"):
        _rank_env(node("10.1.0.3", error="OSError: Network is unreachable"), "10.1.0.1", cluster=True)


class _Dims:      # a model's dimensions as node_threads reads them (big enough for threads to pay)
    hidden_size, moe_intermediate_size = 512, 1024


def test_threads_split_each_nodes_cores():
    a, e = node("10.1.0.1"), node("10.1.0.2", cpus=16.0)
    layout = plan_layout([a, e], 2, 4, cpus_per_rank=1.0)            # experts on the 16-core node
    config = EngineConfig(attention_ranks=2, expert_ranks=4, micro_batches=2)
    assert node_threads(config, layout, e, _Dims).expert == 4 and node_threads(config, layout, a, _Dims).attention[1] == 4
    one = node("127.0.0.1", cpus=2.0)
    shared = plan_layout([one], 1, 1)
    assert node_threads(EngineConfig(micro_batches=1), shared, one, _Dims).expert == 2   # take turns
    assert node_threads(EngineConfig(micro_batches=2), shared, one, _Dims).expert == 1   # overlap


def test_attention_layers_of_decode_steps_run_on_one_thread_where_ranks_take_turns_on_cpus():
    one = node("127.0.0.1", cpus=2.0)
    shared = plan_layout([one], 1, 1)
    assert node_threads(EngineConfig(micro_batches=1), shared, one, _Dims).attention == (1, 2)
    assert node_threads(EngineConfig(micro_batches=2), shared, one, _Dims).attention == (1, 1)          # both sides busy at once
    assert node_threads(EngineConfig(threads_per_rank=2), shared, one, _Dims).attention == (2, 2)       # the user's count
    nodes = {n.node_id: n for n in (node("10.1.0.1"), node("10.1.0.2"))}
    apart = plan_layout(list(nodes.values()), 1, 1, cpus_per_rank=8.0)
    assert apart.attention_nodes != apart.expert_nodes
    home = nodes[apart.attention_nodes[0]]
    assert node_threads(EngineConfig(micro_batches=1), apart, home, _Dims).attention == (8, 8)   # no expert rank beside it


def test_small_models_run_one_thread_per_rank():
    class Tiny:
        hidden_size, moe_intermediate_size = 64, 128
    one = node("127.0.0.1", cpus=2.0)
    threads = node_threads(EngineConfig(micro_batches=1), plan_layout([one], 1, 1), one, Tiny)
    assert threads.attention == (1, 1) and threads.expert == 1
