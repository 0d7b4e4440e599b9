"""Node roles and rank placement from recorded inventories: what NVML reports on these GPU models
(name, total memory, max memory clock, memory bus width — as `nvidia-smi -q` shows them) and what
`ray.nodes()` reports for each node. The NVML side goes through `local_gpus()` with a stand-in
`pynvml` that answers from the recording, so the bandwidth arithmetic is the real one."""

import sys
import types

import pytest

from cluster.inventory import GpuInfo, describe_this_node, gpu_peak, local_gpus, node_from_ray, route_to
from cluster.roles import ATTENTION, BOTH, EXPERT, NONE, PlacementError, plan_layout

# (NVML name, memory total bytes, max memory clock MHz, memory bus width bits)
H100 = ("NVIDIA H100 80GB HBM3", 85520809984, 2619, 5120)
L40S = ("NVIDIA L40S", 48305799168, 9001, 384)
H20 = ("NVIDIA H20", 102642122752, 2619, 6144)


class FakeNvml(types.ModuleType):
    """pynvml answering from a recorded device list."""

    class NVMLError(Exception):
        pass

    NVML_CLOCK_MEM = 2

    def __init__(self, devices, fail_init=False):
        super().__init__("pynvml")
        self.devices, self.fail_init, self.open = devices, fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.devices[h][0].encode()      # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=self.devices[h][1], free=0, used=0)

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_MEM
        return self.devices[h][2]

    def nvmlDeviceGetMemoryBusWidth(self, h):
        return self.devices[h][3]


def recorded_gpus(monkeypatch, devices):
    fake = FakeNvml(devices)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = local_gpus()
    assert fake.open == 0, "NVML left initialised"
    return gpus


def node(monkeypatch, ip, cpus, devices=(), head=False, **resources):
    """A node as the deployment sees it: ray.nodes() entry + describe_this_node() run there."""
    res = {"CPU": float(cpus), "memory": 1e11, f"node:{ip}": 1.0, **{k: float(v) for k, v in resources.items()}}
    if devices:
        res["GPU"] = float(len(devices))
    if head:
        res["node:__internal_head__"] = 1.0
    entry = {"NodeID": f"id-{ip}", "NodeManagerAddress": ip, "Alive": True, "Resources": res}
    gpus = recorded_gpus(monkeypatch, list(devices))
    described = {"hostname": f"host-{ip}", "gpus": [g.__dict__ for g in gpus],
                 "route_ifname": "eth0", "route_source": ip, "route_error": None}
    return node_from_ray(entry, described)


# ---- NVML --------------------------------------------------------------------------------
def test_local_gpus_from_nvml(monkeypatch):
    gpus = recorded_gpus(monkeypatch, [H100, L40S])
    assert gpus[0] == GpuInfo("NVIDIA H100 80GB HBM3", 85520809984, pytest.approx(3352.3, abs=0.1), 0)
    assert gpus[1].name == "NVIDIA L40S" and gpus[1].index == 1
    assert gpus[1].mem_bandwidth_gbs == pytest.approx(864.1, abs=0.1)


def test_no_nvml_is_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], fail_init=True))
    assert local_gpus() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)        # not installed: import fails
    assert local_gpus() == []


def test_peak_table():
    assert gpu_peak("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert gpu_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_peak("NVIDIA H20")[0] == 148.0
    assert gpu_peak("NVIDIA L40S")[0] == 362.0 and gpu_peak("NVIDIA L40")[0] == 181.0
    assert gpu_peak("Some Future GPU") == (None, None)


# ---- roles from GPU models ---------------------------------------------------------------------
def test_h100_and_l40s(monkeypatch):
    nodes = [node(monkeypatch, "10.0.0.1", 8, head=True),                       # CPU head
             node(monkeypatch, "10.0.0.2", 64, [H100] * 8),
             node(monkeypatch, "10.0.0.3", 64, [L40S] * 8),
             node(monkeypatch, "10.0.0.4", 64, [L40S] * 8)]
    layout = plan_layout(nodes, n_attention=4, n_expert=12)
    assert layout.mode == "gpu-inventory"
    roles = {n.address: layout.roles[n.node_id] for n in nodes}
    # H100: 3352 GB/s / 989 TFLOP/s = 3.4 bytes/kFLOP > L40S 864 / 362 = 2.4
    assert roles == {"10.0.0.1": NONE, "10.0.0.2": ATTENTION, "10.0.0.3": EXPERT, "10.0.0.4": EXPERT}
    assert layout.attention_nodes == ("id-10.0.0.2",) * 4
    assert layout.expert_nodes == ("id-10.0.0.3",) * 8 + ("id-10.0.0.4",) * 4
    assert (layout.device, layout.backend, layout.gpus_per_rank) == ("cuda", "nccl", 1.0)
    assert layout.bundle("expert") == {"CPU": 1.0, "GPU": 1.0}
    assert "most bandwidth per FLOP" in layout.reasons["id-10.0.0.2"]


def test_h20_and_l40s(monkeypatch):
    """The MegaScale-Infer pairing: H20 (4 TB/s, 148 TFLOP/s) for attention, L40S for experts."""
    nodes = [node(monkeypatch, "10.0.1.1", 32, [L40S] * 4, head=True),
             node(monkeypatch, "10.0.1.2", 32, [H20] * 8)]
    layout = plan_layout(nodes, n_attention=8, n_expert=4)
    assert layout.roles == {"id-10.0.1.1": EXPERT, "id-10.0.1.2": ATTENTION}
    assert layout.attention_nodes == ("id-10.0.1.2",) * 8 and layout.expert_nodes == ("id-10.0.1.1",) * 4
    assert layout.backend == "nccl"
    assert "27.2 bytes per kFLOP" in layout.reasons["id-10.0.1.2"]


def test_experts_fill_the_most_flops_first(monkeypatch):
    l4 = ("NVIDIA L4", 24152899584, 6251, 192)
    nodes = [node(monkeypatch, "10.0.2.1", 16, [H20] * 2), node(monkeypatch, "10.0.2.2", 16, [l4] * 2),
             node(monkeypatch, "10.0.2.3", 16, [L40S] * 2)]
    layout = plan_layout(nodes, n_attention=2, n_expert=3)
    assert layout.roles["id-10.0.2.1"] == ATTENTION
    assert layout.expert_nodes == ("id-10.0.2.3", "id-10.0.2.3", "id-10.0.2.2")   # L40S before L4


def test_too_few_gpus_share_them_over_gloo(monkeypatch):
    nodes = [node(monkeypatch, "10.0.3.1", 16, [H100]), node(monkeypatch, "10.0.3.2", 16, [L40S] * 2)]
    layout = plan_layout(nodes, n_attention=2, n_expert=4)
    assert layout.gpus_per_rank == 0.5 and layout.backend == "gloo"     # NCCL needs a GPU per rank
    assert layout.attention_nodes == ("id-10.0.3.1",) * 2 and layout.expert_nodes == ("id-10.0.3.2",) * 4


def test_one_gpu_model_serves_both_roles(monkeypatch):
    nodes = [node(monkeypatch, "10.0.4.1", 16, [H100] * 8), node(monkeypatch, "10.0.4.2", 16, [H100] * 8)]
    layout = plan_layout(nodes, n_attention=4, n_expert=8)
    assert set(layout.roles.values()) == {BOTH}
    assert layout.attention_nodes == ("id-10.0.4.1",) * 4
    assert layout.expert_nodes == ("id-10.0.4.1",) * 4 + ("id-10.0.4.2",) * 4     # packed: NVLink first
    assert layout.backend == "nccl"


def test_single_gpu_machine_shares_the_gpu(monkeypatch):
    layout = plan_layout([node(monkeypatch, "127.0.0.1", 16, [H100], head=True)], n_attention=1, n_expert=2)
    assert (layout.device, layout.backend) == ("cuda", "gloo")
    assert layout.gpus_per_rank == pytest.approx(1 / 3, abs=1e-3)
    on_cpu = plan_layout([node(monkeypatch, "127.0.0.1", 16, [H100])], 1, 2, device="cpu")
    assert (on_cpu.device, on_cpu.gpus_per_rank, on_cpu.bundle("attention")) == ("cpu", 0.0, {"CPU": 1.0})


def test_unknown_gpu_model_is_said(monkeypatch):
    odd = ("NVIDIA Hypothetical X1", 10 ** 11, 3000, 8192)
    nodes = [node(monkeypatch, "10.0.5.1", 16, [odd]), node(monkeypatch, "10.0.5.2", 16, [L40S])]
    layout = plan_layout(nodes, 1, 1)
    assert set(layout.roles.values()) == {BOTH}
    assert "no peak FLOP/s" in layout.reasons["id-10.0.5.1"] and "Hypothetical" in layout.reasons["id-10.0.5.1"]


# ---- declared roles ---------------------------------------------------------------------------
def test_declared_roles_win_over_the_inventory(monkeypatch):
    nodes = [node(monkeypatch, "10.0.6.1", 16, [L40S] * 2, shuttle_attention=2),    # against the NVML rule
             node(monkeypatch, "10.0.6.2", 16, [H20] * 2, shuttle_expert=2)]
    layout = plan_layout(nodes, 2, 2)
    assert layout.mode == "declared"
    assert layout.attention_nodes == ("id-10.0.6.1",) * 2 and layout.expert_nodes == ("id-10.0.6.2",) * 2
    assert layout.bundle("attention") == {"CPU": 1.0, "GPU": 1.0, "shuttle_attention": 1.0}
    with pytest.raises(PlacementError, match=r"3 expert ranks do not fit: slots for expert ranks per node: 10.0.6.2 2"):
        plan_layout(nodes, 2, 3)
    with pytest.raises(PlacementError, match="no node declares shuttle_expert"):
        plan_layout(nodes[:1], 2, 2)


def test_declared_roles_on_cpu(monkeypatch):
    nodes = [node(monkeypatch, "10.0.7.1", 2, head=True, shuttle_attention=2),
             node(monkeypatch, "10.0.7.2", 2, shuttle_expert=2)]
    layout = plan_layout(nodes, 2, 2)
    assert (layout.device, layout.backend, layout.cpus_per_rank) == ("cpu", "gloo", 1.0)
    assert layout.roles == {"id-10.0.7.1": ATTENTION, "id-10.0.7.2": EXPERT}
    assert layout.bundle("expert") == {"CPU": 1.0, "shuttle_expert": 1.0}
    assert plan_layout(nodes, 2, 1).cpus_per_rank == 1.0


# ---- CPU-only clusters ------------------------------------------------------------------------------
def test_cpu_only_by_cpu_slots(monkeypatch):
    nodes = [node(monkeypatch, "10.0.8.1", 4, head=True), node(monkeypatch, "10.0.8.2", 16),
             node(monkeypatch, "10.0.8.3", 8)]
    layout = plan_layout(nodes, n_attention=6, n_expert=12, cpus_per_rank=1.0)
    assert layout.mode == "cpu-slots" and layout.device == "cpu"
    # experts take the most slots (16, then 8 when 16 is not enough), attention the rest (4 + ...)
    assert layout.roles == {"id-10.0.8.2": EXPERT, "id-10.0.8.3": ATTENTION, "id-10.0.8.1": ATTENTION}
    assert layout.expert_nodes == ("id-10.0.8.2",) * 12
    assert layout.attention_nodes.count("id-10.0.8.3") == 6          # 8 slots hold all six
    with pytest.raises(PlacementError, match="do not fit"):
        plan_layout(nodes, n_attention=20, n_expert=20, cpus_per_rank=1.0)


def test_cpu_only_too_small_to_split_shares_nodes(monkeypatch):
    nodes = [node(monkeypatch, "10.0.9.1", 2), node(monkeypatch, "10.0.9.2", 2)]
    layout = plan_layout(nodes, n_attention=2, n_expert=4)           # auto CPUs: 6 ranks over 4 CPUs
    assert set(layout.roles.values()) == {BOTH}
    assert layout.cpus_per_rank == pytest.approx(2 / 3, abs=0.01)
    assert len(layout.attention_nodes + layout.expert_nodes) == 6


def test_cpu_single_node_is_the_private_ray_case(monkeypatch):
    layout = plan_layout([node(monkeypatch, "127.0.0.1", 2, head=True)], n_attention=2, n_expert=3)
    assert layout.roles == {"id-127.0.0.1": BOTH}
    assert layout.cpus_per_rank == 0.4 and layout.backend == "gloo"   # as before: CPUs shared evenly
    with pytest.raises(PlacementError, match="device cuda: no node"):
        plan_layout([node(monkeypatch, "127.0.0.1", 2)], 1, 1, device="cuda")


# ---- routes ------------------------------------------------------------------------------------
def test_route_to_loopback_and_self():
    assert route_to("127.0.0.1") == ("lo", "127.0.0.1")
    described = describe_this_node("127.0.0.1")
    assert described["route_ifname"] == "lo" and described["route_error"] is None
    assert describe_this_node("no-such-host.invalid")["route_error"].startswith("gaierror")


def test_inventory_table_says_role_reason_and_ranks(monkeypatch):
    from scheduler.config import EngineConfig
    from shuttle.cluster_cmd import render
    nodes = [node(monkeypatch, "10.0.1.1", 32, [L40S] * 4, head=True), node(monkeypatch, "10.0.1.2", 32, [H20] * 8)]
    config = EngineConfig(attention_ranks=2, expert_ranks=3)
    text = render(nodes, plan_layout(nodes, 2, 3), None, "10.0.1.1", config)
    assert "node 10.0.1.2  host-10.0.1.2" in text and "GPU 7: NVIDIA H20, 95.6 GiB, 4023 GB/s" in text
    assert "role: attention — NVIDIA H20: 4023 GB/s / 148 TFLOP/s = 27.2 bytes per kFLOP, the most bandwidth per FLOP" in text
    assert "ranks: expert 0, expert 1, expert 2" in text
    assert text.endswith("plan: 2 attention + 3 expert ranks by gpu-inventory; cuda, nccl; 1 CPU + 1 GPU per rank")
    refused = render(nodes, None, "9 expert ranks do not fit", "10.0.1.1", config)
    assert refused.endswith("cannot be placed: 9 expert ranks do not fit")


def test_a_node_declaring_both_roles_hosts_both(monkeypatch):
    both = node(monkeypatch, "10.0.10.1", 32, [H100] * 4, shuttle_attention=4, shuttle_expert=4)
    layout = plan_layout([both], 2, 2)
    assert layout.roles == {"id-10.0.10.1": BOTH}
    assert (layout.backend, layout.gpus_per_rank) == ("nccl", 1.0)                  # 4 ranks, 4 GPUs
    shared = plan_layout([both], 4, 4)                                               # 8 ranks, 4 GPUs
    assert (shared.backend, shared.gpus_per_rank) == ("gloo", 0.5)
    with pytest.raises(PlacementError, match="5 attention ranks do not fit"):
        plan_layout([both], 5, 1)
