"""ExpertRank: a plain class; `actor.py` wraps it for Ray.

Driven by data, not calls: `serve()` loops on its transfer endpoint — wait for the next (layer, micro-batch)
from every attention rank, run the grouped experts over all their tokens at once, send each
attention rank its rows back — until every attention rank has sent its shutdown header.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from expert_node.experts import ExpertShard
from models.checkpoint import CheckpointReader, torch_dtype
from models.spec import ModelSpec
from scheduler.messages import TraceEvent
from transfer.base import ExpertBatch, ExpertEndpoint

TRACE_EVENTS_KEPT = 200_000


class ExpertRank:
    def __init__(self, rank: int, spec: ModelSpec, experts: list[int], dtype: str, model_dir: str,
                 transfer: ExpertEndpoint, device: str = "cpu"):
        self.rank = rank
        self.transfer = transfer
        self.spec = spec
        self.device = torch.device(device)
        reader = CheckpointReader(model_dir)
        self.shard = ExpertShard.load(spec, reader, experts, torch_dtype(dtype), self.device)
        self.tensors_read = list(reader.names_read)
        reader.close()
        # empty_messages: (attention rank, layer, micro-batch) messages that routed no token here;
        # expert_gemms: expert weight matrices multiplied (one per expert hit per micro-batch);
        # expert_reads: distinct (step, layer, expert) hit: the weight bytes a step must read at least
        self.stats = {"micro_batches": 0, "tokens": 0, "empty_messages": 0, "expert_gemms": 0, "expert_reads": 0,
                      "compute_s": 0.0, "wait_s": 0.0}
        self.trace: deque[TraceEvent] = deque(maxlen=TRACE_EVENTS_KEPT)   # the latest spans, for timelines
        self._hit_key: tuple[int, int] | None = None
        self._hit: set[int] = set()

    @torch.inference_mode()
    def serve(self) -> dict:
        """Run until every attention rank has shut down, then leave the data plane; returns the counters."""
        try:
            while (batch := self._next()) is not None:
                self.transfer.combine_launch(batch, self.compute(batch))
        finally:
            self.transfer.close()
        return dict(self.stats)

    @torch.inference_mode()
    def compute(self, batch: ExpertBatch) -> list[torch.Tensor]:
        """One (layer, micro-batch): the grouped experts over every attention rank's tokens; returns
        each attention rank's rows of local weighted sums. `serve` calls it for each message; a
        transfer backend may call it inline (transfer/inprocess.py)."""
        counts = [h.shape[0] for h in batch.hidden]
        if len(counts) == 1:        # one attention rank: its tensors as they are, no copies
            return [self.compute_rows(batch.step, batch.layer, batch.micro_batch, batch.hidden[0], batch.topk_ids[0],
                                      batch.topk_weights[0])]
        out = self._forward(batch.step, batch.layer, batch.micro_batch, torch.cat(batch.hidden), torch.cat(batch.topk_ids),
                            torch.cat(batch.topk_weights))
        self.stats["empty_messages"] += counts.count(0)
        return list(out.split(counts))

    def compute_rows(self, step: int, layer: int, micro_batch: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
        """`compute` for one attention rank's rows (hidden [n, H], global ids and float32 weights [n, k]) →
        local weighted sums [n, H]; the counters and the trace as `compute` keeps them. The in-process
        backend calls it directly (inside the attention rank's inference mode), once a layer."""
        self.stats["empty_messages"] += hidden.shape[0] == 0
        return self._forward(step, layer, micro_batch, hidden, topk_ids, topk_weights)

    def decode_kernel_args(self) -> tuple | None:
        """(local index [E], up panels, down panels per MoE layer) where every MoE layer's experts are
        panel-packed (`ExpertShard.grouped`), for the attention rank's whole-step decode kernel
        (models/csrc/layer.cpp DecodeLayers); None otherwise."""
        grouped = [self.shard.grouped.get(layer) for layer in self.spec.moe_layer_ids]
        if not grouped or any(g is None for g in grouped):
            return None
        return self.shard.local_index, [g[1] for g in grouped], [g[2] for g in grouped]

    def record_decode(self, step: int, micro_batch: int, rows: int, counts: torch.Tensor, times: torch.Tensor) -> None:
        """What `compute_rows` counts and traces, for the MoE layers a whole-step decode kernel ran:
        counts [L, X] rows per local expert, times [L, 2] each layer's expert start and end."""
        spans = times.tolist()
        for (start, end), layer, per_expert in zip(spans, self.spec.moe_layer_ids, counts.tolist()):
            self._record(step, layer, micro_batch, rows, start, end, end - start, per_expert)
        self.stats["empty_messages"] += len(spans) * (rows == 0)

    def _forward(self, step: int, layer: int, micro_batch: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        t1 = time.perf_counter()
        t_start = time.time()
        out = self.shard.forward(layer, hidden, topk_ids, topk_weights, reverse=micro_batch % 2 == 1)
        # The span ends when the outputs exist: the combine can land before this process gets to stamp
        # a time after sending it.
        self._record(step, layer, micro_batch, hidden.shape[0], t_start, time.time(), time.perf_counter() - t1,
                     self.shard.last_counts)
        return out

    def _record(self, step: int, layer: int, micro_batch: int, rows: int, start: float, end: float, seconds: float,
                per_expert: list[int]) -> None:
        """One (layer, micro-batch) computed: its trace span and counters (per_expert: rows per local expert)."""
        self.trace.append(TraceEvent("expert", self.rank, step, layer, micro_batch, "expert", start, end, rows))
        self.stats["micro_batches"] += 1
        self.stats["tokens"] += rows
        self.stats["compute_s"] += seconds
        self._count_reads((step, layer), [e for e, c in enumerate(per_expert) if c])

    def _next(self):
        t0 = time.perf_counter()
        batch = self.transfer.dispatch_wait()
        self.stats["wait_s"] += time.perf_counter() - t0
        return batch

    def _count_reads(self, key: tuple[int, int], hit: list[int]) -> None:
        if key != self._hit_key:
            self._hit_key, self._hit = key, set()
        self.stats["expert_gemms"] += len(hit)
        self.stats["expert_reads"] += len(set(hit) - self._hit)
        self._hit.update(hit)
