"""What each rank's process is told about the network: its node's route, not the driver's settings."""

import pytest

from cluster.deployment import DeploymentError, _rank_env, _small_step_threads, _threads
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


def test_threads_split_each_nodes_cores():
    a, e = node("10.1.0.1"), node("10.1.0.2", cpus=16.0)
    layout = plan_layout([a, e], 2, 4, cpus_per_rank=1.0)            # experts on the 16-core node
    config = EngineConfig(attention_ranks=2, expert_ranks=4, micro_batches=2)
    assert _threads(config, layout, e) == 4 and _threads(config, layout, a) == 4
    one = node("127.0.0.1", cpus=2.0)
    shared = plan_layout([one], 1, 1)
    assert _threads(EngineConfig(attention_ranks=1, expert_ranks=1, micro_batches=1), shared, one) == 2   # take turns
    assert _threads(EngineConfig(attention_ranks=1, expert_ranks=1, micro_batches=2), shared, one) == 1   # overlap


def test_attention_layers_of_decode_steps_run_on_one_thread_where_ranks_take_turns_on_cpus():
    one = node("127.0.0.1", cpus=2.0)
    shared = plan_layout([one], 1, 1)
    take_turns = EngineConfig(attention_ranks=1, expert_ranks=1, micro_batches=1)
    assert _small_step_threads(take_turns, shared, one.node_id) == 1
    assert _small_step_threads(EngineConfig(micro_batches=2), shared, one.node_id) is None          # both sides busy at once
    assert _small_step_threads(EngineConfig(threads_per_rank=2), shared, one.node_id) is None       # the user's count
    a, e = node("10.1.0.1"), node("10.1.0.2")
    apart = plan_layout([a, e], 1, 1, cpus_per_rank=8.0)
    assert _small_step_threads(take_turns, apart, apart.attention_nodes[0]) is None   # no expert rank beside it
