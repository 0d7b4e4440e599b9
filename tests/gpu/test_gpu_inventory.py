"""NVML on a real GPU: what cluster/inventory.py reads, and the placement it leads to on one machine."""

import torch

from cluster.inventory import NodeInventory, gpu_peak, local_gpus
from cluster.roles import plan_layout


def test_inventory_reads_every_gpu_with_its_bandwidth():
    gpus = local_gpus()
    assert len(gpus) >= torch.cuda.device_count() >= 1
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert g.memory_bytes > 2 ** 30 and g.mem_bandwidth_gbs and g.mem_bandwidth_gbs > 100, g
        known = gpu_peak(g.name)[1]
        if known:       # NVML's clock x bus width within 10% of the datasheet
            assert abs(g.mem_bandwidth_gbs - known) / known < 0.1, (g, known)


def test_one_machine_places_ranks_on_its_gpus():
    gpus = local_gpus()
    node = NodeInventory("this", "127.0.0.1", "this", cpus=8.0, gpu_slots=float(len(gpus)), gpus=tuple(gpus), is_head=True)
    shared = plan_layout([node], 1, len(gpus))                 # one rank more than GPUs: they share
    assert (shared.device, shared.backend) == ("cuda", "gloo") and shared.gpus_per_rank < 1
    if len(gpus) >= 2:
        own = plan_layout([node], 1, 1)
        assert (own.device, own.backend, own.gpus_per_rank) == ("cuda", "nccl", 1.0)
