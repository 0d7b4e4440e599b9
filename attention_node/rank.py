"""AttentionRank: a plain class (tests build it directly); `actor.py` wraps it for Ray.

It owns the non-expert weights, the paged KV cache of its requests, and the sampler state (each
request's SamplingParams, sent once). One `step(plan)` runs the plan's micro-batches through the
ping-pong executor and samples one token for every chunk that ends its known tokens.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from attention_node.forward import LM_HEAD_ROWS, AttentionForward, RotaryTable, run_pingpong
from attention_node.paged_attention import AttentionBatch, PagedKVCache
from attention_node.sampler import sample
from attention_node.trace import StepTrace
from attention_node.weights import load_attention_weights
from models.checkpoint import CheckpointReader, torch_dtype
from models.spec import ModelSpec
from scheduler.config import EngineConfig, EngineLimits
from scheduler.messages import PENDING_TOKEN, SampledToken, SeqChunk, StepPlan, StepResult
from scheduler.request import SamplingParams
from transfer.base import AttentionEndpoint


# A step of at most this many tokens runs its layers on `threads[0]` (cluster/threads.py says why).
SMALL_STEP_TOKENS = 128
# Prefill chunks whose context is at most this many tokens are attended row by row by the CPU
# decode kernel (each row a decode token whose context ends at itself), and their layers then run as
# one decode_block call. Longer ones go to the prefill kernel (`prefill_attention`). One prompt,
# float32: at 128 tokens rows 53.6 ms against the kernel's 67.6, at 192 level (85.5 / 84.6), at 256
# the kernel 4% faster, at 384 8% (docs/performance.md); 16 prompts of 32 tokens: rows 13% faster.
ROW_PREFILL_CONTEXT = 192


class AttentionRank:
    def __init__(self, rank: int, spec: ModelSpec, config: EngineConfig, limits: EngineLimits, model_dir: str,
                 transfer: AttentionEndpoint, device: str = "cpu", threads: tuple[int, int] | None = None):
        """threads: (for the layers of a step of ≤ SMALL_STEP_TOKENS tokens, for everything else); None
        leaves torch's setting alone."""
        self.rank = rank
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = torch_dtype(config.dtype)
        reader = CheckpointReader(model_dir)
        weights = load_attention_weights(spec, reader, self.dtype, self.device)
        self.tensors_read = list(reader.names_read)
        reader.close()
        self.cache = PagedKVCache(spec.num_layers, limits.kv_blocks_per_rank, limits.block_size,
                                  spec.num_kv_heads, spec.head_dim, self.dtype, self.device)
        rotary = RotaryTable(spec.head_dim, spec.rope_theta, limits.max_model_len, self.dtype, self.device)
        self.forward = AttentionForward(spec, weights, self.cache, rotary, transfer)
        self.params: dict[str, SamplingParams] = {}
        self.last_sampled: dict[str, int] = {}   # request → the token this rank sampled for it last (feeds PENDING_TOKEN)
        self.threads = threads

    def _tokens(self, chunk: SeqChunk) -> list[int]:
        """The chunk's token ids, its PENDING_TOKEN (the head had not seen it) replaced by the one sampled here."""
        if chunk.token_ids[-1] != PENDING_TOKEN:
            return chunk.token_ids
        last = self.last_sampled.get(chunk.request_id)
        if last is None:
            raise RuntimeError(f"attention rank {self.rank}: step asks for the token sampled last for request "
                               f"{chunk.request_id!r}, and this rank sampled none")
        return chunk.token_ids[:-1] + [last]

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        """Run the plan's micro-batches and sample; with `plan.decode_steps` > 1 (every chunk one decode
        token), that many times, each pass feeding the tokens the one before sampled."""
        for request_id in plan.released:
            self.params.pop(request_id, None)
            self.last_sampled.pop(request_id, None)
        for new in plan.new_requests:
            self.params[new.request_id] = new.sampling
        trace = StepTrace(self.rank, plan.step, keep_spans=plan.trace)
        timings = {"prepare": 0.0, "forward": 0.0, "combine_wait": 0.0, "lm_head_sample": 0.0}
        done, tokens = 0, []
        if len(plan.micro_batches) == 1 and not plan.return_logits and not trace.keep_spans:
            done, tokens = self._greedy_steps(plan, plan.micro_batches[0], timings)
        for k in range(done, plan.decode_steps):
            micro_batches = plan.micro_batches if not k else [
                [replace(c, token_ids=[PENDING_TOKEN], start_pos=c.start_pos + k, output_index=c.output_index + k)
                 for c in chunks] for chunks in plan.micro_batches]
            tokens += self._pass(plan, micro_batches, trace, timings)
        timings["combine_wait"] = trace.wait_s
        return StepResult(step=plan.step, rank=self.rank, tokens=tokens, timings=timings, trace=trace.events)

    def _threads(self, tokens: int) -> tuple[int, int]:
        """(threads for the layers of a step of this many tokens, threads for the LM head and the rest)."""
        return self.threads[0] if tokens <= SMALL_STEP_TOKENS else self.threads[1], self.threads[1]

    def _greedy_steps(self, plan: StepPlan, chunks: list[SeqChunk], timings: dict[str, float]) -> tuple[int, list[SampledToken]]:
        """The call's decode steps in one kernel call (`AttentionForward.greedy_steps`) where every chunk
        is a decode token of a greedy request that wants no logprobs: (steps done, their tokens); (0, [])
        where that does not apply, and the passes below run every step. The same tokens as those passes."""
        t0 = time.perf_counter()
        params = [self.params[c.request_id] for c in chunks]
        if not chunks or any(len(c.token_ids) != 1 or not c.sample for c in chunks) \
                or not all(p.greedy and not p.logprobs for p in params):
            return 0, []
        got = self.forward.greedy_steps(plan.step, [self._tokens(c)[0] for c in chunks], [c.start_pos for c in chunks],
                                        [c.block_table for c in chunks], plan.decode_steps,
                                        self._threads(len(chunks)) if self.threads is not None else (0, 0))
        if got is None:
            return 0, []
        picked, stopped, layers_s, head_s = got
        t1 = time.perf_counter()
        tokens = [SampledToken(c.request_id, t, float("nan"), None) for row in picked for c, t in zip(chunks, row)]
        last = picked[-1] if picked else None
        if stopped is not None:     # a row without a finite maximum stopped the loop: that step through the sampler
            last, logprobs = sample(stopped, params, [c.output_index + len(picked) for c in chunks])
            tokens += [SampledToken(c.request_id, t, lp, None) for c, t, lp in zip(chunks, last, logprobs)]
        if last is not None:
            self.last_sampled.update((c.request_id, t) for c, t in zip(chunks, last))
        t2 = time.perf_counter()
        timings["prepare"] += (t1 - t0) - layers_s - head_s
        timings["forward"] += layers_s
        timings["lm_head_sample"] += head_s + (t2 - t1)
        return len(picked) + (stopped is not None), tokens

    def _pass(self, plan: StepPlan, micro_batches: list[list[SeqChunk]], trace: StepTrace,
              timings: dict[str, float]) -> list[SampledToken]:
        """One forward pass of these micro-batches, then the LM head and sampling of their sampled rows."""
        t0 = time.perf_counter()
        programs, sampled = [], []
        if self.threads is not None:
            torch.set_num_threads(self._threads(sum(len(c.token_ids) for chunks in micro_batches for c in chunks))[0])
        for j, chunks in enumerate(micro_batches):
            batch = AttentionBatch.build(chunks, self.cache.block_size, self.device,
                                         ROW_PREFILL_CONTEXT if self.cache.decode_kernel is not None else 0)
            input_ids = torch.tensor([t for c in chunks for t in self._tokens(c)], dtype=torch.long, device=self.device)
            programs.append(self.forward.program(plan.step, j, input_ids, batch, trace))
            sampled += [c for c in chunks if c.sample]
        t1 = time.perf_counter()
        outs = run_pingpong(programs)
        hidden = outs[0] if len(outs) == 1 else torch.cat(outs)      # [N, H], rows in `sampled` order
        t2 = time.perf_counter()
        t_wall = time.time()
        if self.threads is not None:
            torch.set_num_threads(self.threads[1])
        tokens = []
        params = [self.params[c.request_id] for c in sampled]
        picks = None
        if sampled and not plan.return_logits and all(p.greedy and not p.logprobs for p in params):
            picks = self.forward.greedy_pick(hidden)       # a few greedy rows: the head's int8 screen
        if picks is not None:
            tokens = [SampledToken(c.request_id, t, float("nan"), None) for c, t in zip(sampled, picks)]
            self.last_sampled.update((c.request_id, t) for c, t in zip(sampled, picks))
            sampled = []
        # LM head and sampling in row blocks of bounded [rows, V] logits, never one [N, V] tensor (a
        # fresh multi-MB tensor is page-faulted in on every step).
        for start in range(0, len(sampled), LM_HEAD_ROWS):
            chunks = sampled[start:start + LM_HEAD_ROWS]
            logits = self.forward.logits(hidden[start:start + LM_HEAD_ROWS])
            ids, logprobs = sample(logits, params[start:start + LM_HEAD_ROWS], [c.output_index for c in chunks])
            tokens += [SampledToken(c.request_id, t, lp, logits[i].tolist() if plan.return_logits else None)
                       for i, (c, t, lp) in enumerate(zip(chunks, ids, logprobs))]
            self.last_sampled.update((c.request_id, t) for c, t in zip(chunks, ids))
        trace.lm_head(t_wall)
        t3 = time.perf_counter()
        for name, dt in (("prepare", t1 - t0), ("forward", t2 - t1), ("lm_head_sample", t3 - t2)):
            timings[name] += dt
        return tokens

    def close(self) -> None:
        """Tell the expert ranks this rank is done and leave the data plane."""
        self.forward.transfer.close()
