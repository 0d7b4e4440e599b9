"""The GPU catalogue: what plans may be made for, attached or not.

Built-in figures are datasheet values (dense bf16 tensor FLOP/s, HBM/GDDR bandwidth, memory);
`price` is a relative cost per GPU-hour (H100 SXM = 1.0), indicative only — override it with what
you pay. A YAML file extends or overrides entries:

    gpus:
      H20:   {price: 0.40}                       # override one field
      MyGPU: {memory_gb: 64, bandwidth_gbs: 2000, bf16_tflops: 400, price: 0.6, net_gbs: 50}

Local accelerators come from NVML through `cluster.inventory.local_gpus()` (owned by cluster/);
on a machine without NVML the list is empty, which is normal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import yaml

from cluster.inventory import local_gpus


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gb: float          # device memory
    bandwidth_gbs: float      # device memory read bandwidth
    bf16_tflops: float        # dense bf16 tensor throughput
    price: float              # relative cost per GPU-hour
    net_gbs: float = 50.0     # per-GPU network bandwidth for M2N/N2M (400 Gb/s NIC = 50 GB/s)
    link_gbs: float = 450.0   # intra-node GPU-GPU bandwidth for tensor parallelism (NVLink or PCIe)
    local: bool = False       # found on this machine by NVML

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_gb:g} GB, {self.bandwidth_gbs:g} GB/s, {self.bf16_tflops:g} TFLOP/s bf16, "
                f"price {self.price:g}, net {self.net_gbs:g} GB/s")


BUILTIN = {g.name: g for g in [
    GpuType("H100", 80, 3350, 989, 1.00, net_gbs=50, link_gbs=450),
    GpuType("H200", 141, 4800, 989, 1.25, net_gbs=50, link_gbs=450),
    GpuType("H800", 80, 3350, 989, 1.00, net_gbs=50, link_gbs=200),
    GpuType("H20", 96, 4000, 148, 0.45, net_gbs=50, link_gbs=450),
    GpuType("A100-80G", 80, 2039, 312, 0.55, net_gbs=25, link_gbs=300),
    GpuType("A100-40G", 40, 1555, 312, 0.45, net_gbs=25, link_gbs=300),
    GpuType("L40S", 48, 864, 362, 0.35, net_gbs=25, link_gbs=32),
    GpuType("L4", 24, 300, 121, 0.12, net_gbs=12.5, link_gbs=32),
    GpuType("A10", 24, 600, 125, 0.18, net_gbs=12.5, link_gbs=32),
    GpuType("MI300X", 192, 5300, 1307, 0.90, net_gbs=50, link_gbs=448),
    GpuType("B200", 180, 8000, 2250, 1.60, net_gbs=100, link_gbs=900),
]}

_FIELDS = {f.name for f in fields(GpuType)} - {"name", "local"}


def load_catalogue(path: str | None = None, include_local: bool = True) -> dict[str, GpuType]:
    """Built-in table, then NVML-discovered GPUs, then the user's YAML file (last word wins)."""
    catalogue = dict(BUILTIN)
    if include_local:
        for g in local_gpu_types(catalogue):
            catalogue[g.name] = g
    if path:
        catalogue.update(_read_overrides(path, catalogue))
    return catalogue


def _read_overrides(path: str, catalogue: dict[str, GpuType]) -> dict[str, GpuType]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"GPU catalogue {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"GPU catalogue {path!r} is not valid YAML: {e}") from None
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"GPU catalogue {path!r} must hold a mapping 'gpus: {{NAME: {{field: value}}}}'")
    out = {}
    for name, values in entries.items():
        if not isinstance(values, dict):
            raise ValueError(f"GPU catalogue {path!r}: entry {name!r} must be a mapping of fields")
        unknown = sorted(set(values) - _FIELDS)
        if unknown:
            raise ValueError(f"GPU catalogue {path!r}: {name}: unknown fields {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
        values = {k: float(v) for k, v in values.items()}
        if name in catalogue:
            out[name] = replace(catalogue[name], **values)
        else:
            missing = sorted({"memory_gb", "bandwidth_gbs", "bf16_tflops", "price"} - set(values))
            if missing:
                raise ValueError(f"GPU catalogue {path!r}: new GPU {name!r} needs {', '.join(missing)}")
            out[name] = GpuType(name=name, **values)
        bad = [k for k in ("memory_gb", "bandwidth_gbs", "bf16_tflops", "price", "net_gbs", "link_gbs") if getattr(out[name], k) <= 0]
        if bad:
            raise ValueError(f"GPU catalogue {path!r}: {name}: {', '.join(bad)} must be > 0")
    return out


def local_gpu_types(catalogue: dict[str, GpuType]) -> list[GpuType]:
    """NVML's GPUs as catalogue entries: known models borrow the table's FLOP/s and price."""
    found = []
    for g in local_gpus():
        name = g.name.lower()
        # most specific first, so "H200" is not taken for "H20"; "A100-80G" matches on "a100"
        by_length = sorted(catalogue.items(), key=lambda kv: -len(kv[0].split("-")[0]))
        known = next((c for key, c in by_length if not c.local and key.split("-")[0].lower() in name), None)
        memory_gb = g.memory_bytes / 1e9
        bandwidth = g.mem_bandwidth_gbs or (known.bandwidth_gbs if known else None)
        if known is None and bandwidth is None:
            continue        # nothing to base a cost on; the user can add it in the YAML file
        base = known or GpuType(g.name, memory_gb, bandwidth, 100.0, 1.0)
        found.append(replace(base, name=f"local:{g.name}", memory_gb=memory_gb, bandwidth_gbs=bandwidth, local=True))
    unique = {g.name: g for g in found}
    return list(unique.values())
