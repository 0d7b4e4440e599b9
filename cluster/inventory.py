"""What a node has: its GPUs (from NVML), its Ray resources, and its route to the head.

    local_gpus()            the GPUs of this machine, [] without NVML (a CPU machine is not an error)
    gpu_peak(name)          a GPU model's peak dense bf16 TFLOP/s and memory bandwidth, from a table
    gather_inventory(host)  one small Ray task per alive node: every node's NodeInventory

Nothing here imports torch: the per-node task runs in a bare Ray worker in well under a second.

Glossary
- role resources: Ray custom resources a node advertises to declare what it is for, one unit per
  rank slot: `shuttle_attention: N` (N attention ranks fit), `shuttle_expert: N`.
- route: the interface and source address a node uses to reach the data-plane rendezvous (the
  head's TCPStore); gloo and NCCL must listen on that interface so peers can connect back.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass, field

ATTENTION_RESOURCE = "shuttle_attention"
EXPERT_RESOURCE = "shuttle_expert"


@dataclass(frozen=True)
class GpuInfo:
    name: str                         # as NVML reports it: "NVIDIA H100 80GB HBM3"
    memory_bytes: int
    mem_bandwidth_gbs: float | None   # peak, from NVML's memory clock x bus width; None if unknown
    index: int                        # NVML index on its node


# Peak dense bf16 tensor TFLOP/s and memory bandwidth in GB/s from the vendors' datasheets.
# Matched as a substring of the upper-cased NVML name, most specific first; NVML names the H100 SXM
# "NVIDIA H100 80GB HBM3". Bandwidth from NVML wins when it has one.
_PEAKS: list[tuple[str, float, float]] = [
    ("GH200", 989.0, 4000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIE", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("H200", 989.0, 4800.0),
    ("H800", 989.0, 3350.0),
    ("H20", 148.0, 4000.0),
    ("B200", 2250.0, 8000.0),
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100-PCIE-40GB", 312.0, 1555.0),
    ("A100", 312.0, 2039.0),
    ("A800", 312.0, 2039.0),
    ("L40S", 362.0, 864.0),
    ("L40", 181.0, 864.0),
    ("L20", 120.0, 864.0),
    ("L4", 121.0, 300.0),
    ("A10G", 70.0, 600.0),
    ("A10", 125.0, 600.0),
    ("A30", 165.0, 933.0),
    ("T4", 65.0, 320.0),
    ("RTX 4090", 165.0, 1008.0),
    ("V100", 125.0, 900.0),
]


def gpu_peak(name: str) -> tuple[float | None, float | None]:
    """(peak dense bf16 TFLOP/s, memory bandwidth GB/s) of a GPU model, (None, None) if unknown."""
    upper = name.upper()
    for key, tflops, bandwidth in _PEAKS:
        if key in upper:
            return tflops, bandwidth
    return None, None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def local_gpus() -> list[GpuInfo]:
    """This machine's GPUs as NVML sees them (all of them, whatever CUDA_VISIBLE_DEVICES says)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:           # no driver, no device: a CPU machine
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            try:   # DDR: two transfers per clock; MHz x bits / 8 -> MB/s
                clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
                bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
                bandwidth = 2 * clock_mhz * bus_bits / 8 / 1000 if clock_mhz and bus_bits else None
            except (pynvml.NVMLError, AttributeError):
                bandwidth = None
            gpus.append(GpuInfo(name, memory, bandwidth or gpu_peak(name)[1], i))
        return gpus
    finally:
        pynvml.nvmlShutdown()


# ---- routes --------------------------------------------------------------------------------
def route_to(host: str) -> tuple[str, str]:
    """(interface name, source address) this machine uses to reach `host`: the UDP-connect trick
    (no packet is sent), then the interface that owns that source address."""
    target = socket.gethostbyname(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))
        source = s.getsockname()[0]
    if source.startswith("127.") or target.startswith("127."):
        return "lo", source
    for _, ifname in socket.if_nameindex():
        if _ipv4_of(ifname) == source:
            return ifname, source
    raise OSError(f"no network interface owns {source}, the source address of the route to {target}")


def _ipv4_of(ifname: str) -> str | None:
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


# ---- one node -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeInventory:
    node_id: str                      # Ray's node id
    address: str                      # the node's IP as Ray knows it
    hostname: str
    cpus: float                       # Ray's CPU resource on the node
    gpu_slots: float                  # Ray's GPU resource on the node
    gpus: tuple[GpuInfo, ...] = ()    # what NVML reports there
    attention_slots: float = 0.0      # declared role resources (see ATTENTION_RESOURCE)
    expert_slots: float = 0.0
    is_head: bool = False
    route_ifname: str | None = None   # interface towards the rendezvous host (None: not asked)
    route_source: str | None = None
    route_error: str | None = None
    extra: dict = field(default_factory=dict, compare=False)   # other custom resources, for display

    @property
    def declares_role(self) -> bool:
        return self.attention_slots > 0 or self.expert_slots > 0

    @property
    def gpu_name(self) -> str | None:
        """The node's GPU model (the most common one if it mixes models)."""
        if not self.gpus:
            return None
        names = [g.name for g in self.gpus]
        return max(sorted(set(names)), key=names.count)

    def to_dict(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "hostname": self.hostname, "cpus": self.cpus,
                "gpu_slots": self.gpu_slots, "gpus": [g.__dict__ for g in self.gpus],
                "attention_slots": self.attention_slots, "expert_slots": self.expert_slots, "is_head": self.is_head,
                "route_ifname": self.route_ifname, "route_source": self.route_source, "route_error": self.route_error}

    @classmethod
    def from_dict(cls, d: dict) -> "NodeInventory":
        d = dict(d)
        d["gpus"] = tuple(GpuInfo(**g) for g in d.get("gpus", ()))
        return cls(**d)


def describe_this_node(route_host: str | None) -> dict:
    """Runs on each node (a Ray task): hostname, NVML GPUs, and the route to `route_host`."""
    out = {"hostname": socket.gethostname(), "gpus": [g.__dict__ for g in local_gpus()],
           "route_ifname": None, "route_source": None, "route_error": None}
    if route_host:
        try:
            out["route_ifname"], out["route_source"] = route_to(route_host)
        except OSError as e:
            out["route_error"] = f"{type(e).__name__}: {e}"
    return out


def node_from_ray(entry: dict, described: dict, head_address: str | None = None) -> NodeInventory:
    """One `ray.nodes()` entry plus what `describe_this_node` said there."""
    res = entry.get("Resources", {})
    skip = {"CPU", "GPU", "memory", "object_store_memory", ATTENTION_RESOURCE, EXPERT_RESOURCE}
    extra = {k: v for k, v in res.items() if k not in skip and not k.startswith("node:")}
    return NodeInventory(
        node_id=entry["NodeID"], address=entry["NodeManagerAddress"], hostname=described["hostname"],
        cpus=float(res.get("CPU", 0.0)), gpu_slots=float(res.get("GPU", 0.0)),
        gpus=tuple(GpuInfo(**g) for g in described["gpus"]),
        attention_slots=float(res.get(ATTENTION_RESOURCE, 0.0)), expert_slots=float(res.get(EXPERT_RESOURCE, 0.0)),
        is_head="node:__internal_head__" in res or (head_address is not None and entry["NodeManagerAddress"] == head_address),
        route_ifname=described["route_ifname"], route_source=described["route_source"],
        route_error=described["route_error"], extra=extra)


def gather_inventory(route_host: str | None = None, timeout_s: float = 60.0) -> list[NodeInventory]:
    """Every alive node of the connected Ray cluster, described by one small task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    entries = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(describe_this_node)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(route_host) for n in entries]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [entries[refs.index(r)]["NodeManagerAddress"] for r in pending]
        raise RuntimeError(f"node inventory: no answer within {timeout_s:g}s from node(s) {', '.join(late)} "
                           "(are they overloaded, or is Shuttle not installed there?)")
    described = ray.get(refs)
    return [node_from_ray(e, d) for e, d in zip(entries, described)]
