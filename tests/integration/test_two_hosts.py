"""Two hosts on one machine: network namespaces joined by a veth pair, a Ray head in one (declaring
attention slots) and a Ray worker node in the other (declaring expert slots). `shuttle run
--address` from the head's host puts the attention ranks on the head and the expert ranks on the
worker, so every routed token crosses the veth link; the output equals the single-host output.

Root only (ip netns, PID namespaces): skipped with the reason elsewhere. Each Ray node lives in its
own PID namespace, so tearing it down cannot touch any other Ray on the machine.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import netns

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
HEAD, WORKER = "10.213.0.1", "10.213.0.2"
PROMPTS = ["1,2,3,4,5", "9,8,7", "40,41,42,43,44,45,46,47,48,49,50", "200"]
RUN = ["--attention-ranks", "2", "--expert-ranks", "2", "--micro-batches", "2", "--max-tokens", "12",
       "--logprobs", "--prompt-ids", *PROMPTS]


def ray_env() -> dict:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the tests' private-Ray setting) makes `ray start --address` refuse
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


@pytest.fixture(scope="module")
def two_hosts():
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"two-host test: {reason}")
    temp = tempfile.mkdtemp(prefix="shr", dir="/tmp")     # short: Ray's socket paths live under it
    # Ray's own ports below 32768 on both hosts: the failure test blocks ephemeral-to-ephemeral TCP
    # (where gloo, NCCL and the reachability probe connect), not Ray.
    ports = ["--node-manager-port", "7101", "--object-manager-port", "7102", "--metrics-export-port", "7103",
             "--dashboard-agent-listen-port", "7104", "--dashboard-agent-grpc-port", "7105",
             "--runtime-env-agent-port", "7106", "--min-worker-port", "10002", "--max-worker-port", "10200"]
    common = [*ports, "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 << 20),
              "--disable-usage-stats", "--block"]
    trees = []
    with netns.VethPair("shuttle", HEAD, WORKER) as hosts:
        try:
            head = netns.IsolatedTree(
                [f"{BIN}/ray", "start", "--head", "--node-ip-address", HEAD, "--port", "6379",
                 "--resources", json.dumps({"shuttle_attention": 2}), "--temp-dir", f"{temp}/a",
                 "--include-dashboard", "false", *common],
                f"{temp}/head.log", netns=hosts.a.netns, env=ray_env())
            trees.append(head)
            head.wait_for_log("Ray runtime started", 120)
            worker = netns.IsolatedTree(
                [f"{BIN}/ray", "start", "--address", f"{HEAD}:6379", "--node-ip-address", WORKER,
                 "--resources", json.dumps({"shuttle_expert": 2}), "--temp-dir", f"{temp}/b", *common],
                f"{temp}/worker.log", netns=hosts.b.netns, env=ray_env())
            trees.append(worker)
            worker.wait_for_log("Ray runtime started", 120)
            yield hosts, head
        finally:
            for t in reversed(trees):
                t.kill()
            shutil.rmtree(temp, ignore_errors=True)


def test_inventory_sees_both_hosts_and_their_roles(two_hosts):
    hosts, head = two_hosts
    out = head.run([f"{BIN}/shuttle", "cluster", "inventory", "--address", f"{HEAD}:6379", "--json",
                    "--attention-ranks", "2", "--expert-ranks", "2"], timeout=120, env=ray_env())
    inv = json.loads(out.stdout)
    nodes = {n["address"]: n for n in inv["nodes"]}
    assert set(nodes) == {HEAD, WORKER}
    assert nodes[HEAD]["role"] == "attention" and nodes[WORKER]["role"] == "expert"
    assert nodes[HEAD]["route_ifname"] == hosts.a.ifname and nodes[WORKER]["route_ifname"] == hosts.b.ifname
    assert nodes[HEAD]["is_head"] and not nodes[WORKER]["is_head"]
    assert inv["plan"]["attention"] == [HEAD, HEAD] and inv["plan"]["expert"] == [WORKER, WORKER]
    assert (inv["plan"]["device"], inv["plan"]["backend"]) == ("cpu", "gloo")


def test_attention_and_experts_on_two_hosts_match_one_host(two_hosts, tiny_model):
    hosts, head = two_hosts
    model = tiny_model("qwen2_moe")
    before = hosts.b.read_counter("rx_bytes") + hosts.b.read_counter("tx_bytes")
    two = head.run([f"{BIN}/shuttle", "run", "--address", f"{HEAD}:6379", "--model", model, *RUN],
                   timeout=300, env=ray_env())
    crossed = hosts.b.read_counter("rx_bytes") + hosts.b.read_counter("tx_bytes") - before
    # The bring-up says where each rank went and which interface its data plane uses.
    assert f"node {HEAD}" in two.stderr and f"attention ranks 0, 1; data plane via {hosts.a.ifname}" in two.stderr, two.stderr
    assert f"node {WORKER}" in two.stderr and f"expert ranks 0, 1; data plane via {hosts.b.ifname}" in two.stderr, two.stderr
    assert crossed > 100_000, f"only {crossed} bytes crossed the veth link"

    one = subprocess.run([f"{BIN}/shuttle", "run", "--model", model, *RUN], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr[-4000:]
    two_lines = [json.loads(line) for line in two.stdout.splitlines()]
    one_lines = [json.loads(line) for line in one.stdout.splitlines()]
    assert len(two_lines) == len(PROMPTS)
    for a, b in zip(two_lines, one_lines):
        assert a["token_ids"] == b["token_ids"], f"prompt {a['index']}: two hosts {a['token_ids']} != one host {b['token_ids']}"
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-4


def test_a_node_that_cannot_reach_another_is_named(two_hosts, tiny_model):
    """A policy route on the head's host refuses TCP between ephemeral ports (where gloo listens and
    connects) and leaves Ray's ports alone: the bring-up fails within seconds, naming both ends."""
    hosts, head = two_hosts
    rule = ["ip", "-n", hosts.a.netns, "rule", "add", "ipproto", "tcp", "sport", "32768-60999",
            "dport", "32768-60999", "prohibit", "pref", "100"]
    netns.sh(rule)
    try:
        t0 = time.monotonic()
        p = head.run([f"{BIN}/shuttle", "run", "--address", f"{HEAD}:6379", "--model", tiny_model("qwen2_moe"), *RUN],
                     timeout=240, env=ray_env(), check=False)
        elapsed = time.monotonic() - t0
    finally:
        netns.sh(["ip", "-n", hosts.a.netns, "rule", "del", "pref", "100"], check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith("shuttle run: error: data plane: node "), error
    assert (f"node {HEAD} (attention ranks 0, 1; interface {hosts.a.ifname}) cannot reach node {WORKER} "
            f"(expert ranks 0, 1) at {WORKER}:") in error, error
    assert (f"node {WORKER} (expert ranks 0, 1; interface {hosts.b.ifname}) cannot reach the rendezvous host {HEAD} "
            f"at {HEAD}:") in error and "no answer within 5s" in error, error
    assert elapsed < 90, f"the failure took {elapsed:.0f}s"
