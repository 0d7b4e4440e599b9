"""Continuous batching with chunked prefill over data-parallel attention ranks.

Each step, for every attention rank, with a budget of `max_batch_tokens` tokens:
1. running requests, oldest first, get their pending tokens (1 in decode, the next prefill chunk
   otherwise); when the rank's KV pool is short, the newest running request is preempted
   (blocks freed, back to the front of the queue, recomputed later);
2. waiting requests are admitted in arrival order to the rank with the most room (KV use and
   tokens already planned), while some rank has budget, a free sequence slot and blocks for the
   whole prompt. The queue head blocks the rest (no starvation of long prompts).
Then each rank's chunks are split into micro-batches (`microbatch.py`).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import replace

from scheduler.config import EngineConfig, EngineLimits
from scheduler.kv_blocks import BlockPool
from scheduler.messages import PENDING_TOKEN, NewRequest, SeqChunk, StepPlan, StepResult
from scheduler.microbatch import split_micro_batches, step_micro_batches
from scheduler.request import (FinishReason, InvalidRequest, Request, RequestOutput, RequestState,
                               SamplingParams)


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`; the caller should retry later."""


def validate_request(lim: EngineLimits, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
    """Raise InvalidRequest (naming the field) for a request this deployment can never serve.

    Called once, where a request enters (the server's `AsyncEngine.submit`, `shuttle run`): the
    scheduler itself trusts what it is given. SamplingParams checked its own values when built."""
    if not prompt_token_ids:
        raise InvalidRequest("prompt", "is empty")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < lim.vocab_size]
    if bad:
        raise InvalidRequest("token_ids", f"{bad[:5]} outside the vocabulary [0, {lim.vocab_size})")
    bad = [t for t in sampling.stop_token_ids if not 0 <= t < lim.vocab_size]
    if bad:
        raise InvalidRequest("stop_token_ids", f"{bad[:5]} outside the vocabulary [0, {lim.vocab_size})")
    if len(prompt_token_ids) >= lim.max_model_len:
        raise InvalidRequest("prompt", f"has {len(prompt_token_ids)} tokens; the context holds {lim.max_model_len} (prompt plus output)")
    if len(prompt_token_ids) + sampling.max_tokens > lim.max_model_len:
        raise InvalidRequest("max_tokens", f"{sampling.max_tokens} plus the {len(prompt_token_ids)}-token prompt exceeds the context of {lim.max_model_len}")
    need = -(-(len(prompt_token_ids) + sampling.max_tokens) // lim.block_size)
    if need > lim.kv_blocks_per_rank:
        raise InvalidRequest("max_tokens", f"the request needs {need} KV blocks and a rank has only {lim.kv_blocks_per_rank}: it can never fit")


class Scheduler:
    def __init__(self, config: EngineConfig, limits: EngineLimits):
        self.config = config
        self.limits = limits
        n = config.attention_ranks
        self.pools = [BlockPool(limits.kv_blocks_per_rank, limits.block_size) for _ in range(n)]
        self.running: list[list[Request]] = [[] for _ in range(n)]
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.step_id = 0
        self._new: list[list[NewRequest]] = [[] for _ in range(n)]
        self._released: list[list[str]] = [[] for _ in range(n)]

    # ---- requests in and out -------------------------------------------------------------
    def add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        """Queue a request; raises only QueueFull. Trusts its input: the caller has run
        `validate_request` and made sure `request_id` is not in flight (a request that could never
        fit would wait forever, a reused id would replace a live request)."""
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting)")
        if sampling.seed is None:  # every request samples from its own seed: reproducible, batch-independent
            sampling = replace(sampling, seed=random.getrandbits(63))
        req = Request(request_id, list(prompt_token_ids), sampling, arrival_time=time.monotonic())
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        self._finish(req, FinishReason.CANCELLED)
        return RequestOutput(req.request_id, [], [], True, FinishReason.CANCELLED)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, return_logits: bool = False, trace: bool = False) -> list[StepPlan] | None:
        """One StepPlan per attention rank, or None when there is nothing to run.

        May be called again before the results of the step it returned are in (`update`): the
        chunks then assume every request in flight gets the token it is being sampled (PENDING_TOKEN
        in its decode chunk), and a request that the length limit ends with that token is left out."""
        per_rank: list[list[SeqChunk]] = [[] for _ in self.pools]
        budgets = [self.config.max_batch_tokens] * len(self.pools)
        for r in range(len(self.pools)):
            self._schedule_running(r, per_rank[r], budgets)
        self._admit(per_rank, budgets)
        if not any(per_rank):
            return None
        self.step_id += 1
        m = step_micro_batches([len(c) for c in per_rank], self.config.micro_batches)
        steps = self._decode_steps(per_rank) if m == 1 else 1
        plans = [StepPlan(step=self.step_id, micro_batches=split_micro_batches(per_rank[r], m),
                          new_requests=self._new[r], released=self._released[r], return_logits=return_logits,
                          trace=trace, decode_steps=steps)
                 for r in range(len(self.pools))]
        self._new = [[] for _ in self.pools]
        self._released = [[] for _ in self.pools]
        return plans

    def _schedule_running(self, r: int, chunks: list[SeqChunk], budgets: list[int]) -> None:
        i = 0
        while i < len(self.running[r]) and budgets[r] > 0:
            req = self.running[r][i]
            if req.sample_steps and self._length_done(req, len(req.output_token_ids) + len(req.sample_steps)):
                i += 1      # the token in flight is its last: nothing more to compute
                continue
            n = min(req.num_pending, budgets[r])
            if not self.pools[r].grow(req.block_ids, req.num_computed + n):
                victim = self.running[r][-1]
                self._preempt(victim)
                if victim is req:
                    break
                continue
            chunks.append(self._chunk(req, n))
            budgets[r] -= n
            i += 1

    def _decode_steps(self, per_rank: list[list[SeqChunk]]) -> int:
        """How many decode steps this step's one rank call runs (`decode_steps`): more than one only when
        every chunk is one decode token and nobody waits, and no more than any request's length limit
        leaves; the extra tokens' KV blocks are reserved here, and the chunks' block tables with them."""
        want = self.config.decode_steps
        chunks = [c for cs in per_rank for c in cs]
        if want <= 1 or self.waiting or not chunks or any(len(c.token_ids) != 1 or not c.sample for c in chunks):
            return 1
        reqs = [self.requests[c.request_id] for c in chunks]
        room = min(min(req.sampling.max_tokens, self.limits.max_model_len - len(req.prompt_token_ids))
                   - len(req.output_token_ids) - len(req.sample_steps) for req in reqs)
        steps = min(want, 1 + room)
        if steps <= 1 or not all(self.pools[req.rank].grow(req.block_ids, req.num_computed + steps - 1) for req in reqs):
            return 1            # (blocks a partial growth took stay with their requests: they need them next)
        for cs in per_rank:
            for i, c in enumerate(cs):
                req = self.requests[c.request_id]
                req.num_computed += steps - 1
                req.sample_steps += [self.step_id] * (steps - 1)
                cs[i] = replace(c, block_table=list(req.block_ids))
        return steps

    def _admit(self, per_rank: list[list[SeqChunk]], budgets: list[int]) -> None:
        while self.waiting:
            req = self.waiting[0]
            rank = self._pick_rank(req, budgets)
            if rank is None:
                return
            self.waiting.popleft()
            n = min(req.num_pending, budgets[rank])
            assert self.pools[rank].grow(req.block_ids, req.num_computed + n)
            req.state, req.rank = RequestState.RUNNING, rank
            self.running[rank].append(req)
            self._new[rank].append(NewRequest(req.request_id, req.sampling))
            per_rank[rank].append(self._chunk(req, n))
            budgets[rank] -= n

    def _pick_rank(self, req: Request, budgets: list[int]) -> int | None:
        def load(r: int) -> tuple[float, int]:
            pool = self.pools[r]
            planned = 1.0 - budgets[r] / self.config.max_batch_tokens
            return (pool.num_used / pool.num_blocks + planned, len(self.running[r]))

        fits = [r for r, pool in enumerate(self.pools)
                if budgets[r] > 0 and len(self.running[r]) < self.config.max_num_seqs
                and pool.num_free >= pool.blocks_for(req.num_tokens)]
        return min(fits, key=load) if fits else None

    def _chunk(self, req: Request, n: int) -> SeqChunk:
        start = req.num_computed
        known = req.all_token_ids + [PENDING_TOKEN] * len(req.sample_steps)
        sample = start + n == len(known)
        chunk = SeqChunk(request_id=req.request_id, token_ids=known[start:start + n], start_pos=start,
                         block_table=list(req.block_ids), sample=sample,
                         output_index=len(req.output_token_ids) + len(req.sample_steps))
        req.num_computed += n           # counted when scheduled: a step scheduled ahead starts from here
        if sample:
            req.sample_steps.append(self.step_id + 1)
        return chunk

    def _preempt(self, req: Request) -> None:
        r = req.rank
        self.running[r].remove(req)
        self.pools[r].release(req.block_ids)
        self._released[r].append(req.request_id)
        req.state, req.rank, req.num_computed = RequestState.WAITING, None, 0
        req.sample_steps.clear()        # a token still in flight is dropped and sampled again on recompute
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def requeue_all(self, max_recoveries: int) -> list[RequestOutput]:
        """After a lost step (a rank failed and the ranks were replaced): every running request goes back
        to the front of the queue, in arrival order, to be recomputed from its prompt plus the tokens it
        already has, as preemption does; the ranks' state is gone, so nothing is released to them. A
        request caught by more than `max_recoveries` faults is finished instead (FinishReason.ERROR)."""
        failed = []
        running = sorted((req for reqs in self.running for req in reqs), key=lambda r: r.arrival_time)
        self.running = [[] for _ in self.pools]
        self.pools = [BlockPool(self.limits.kv_blocks_per_rank, self.limits.block_size) for _ in self.pools]
        self._new = [[] for _ in self.pools]
        self._released = [[] for _ in self.pools]
        for req in reversed(running):
            req.state, req.rank, req.num_computed, req.block_ids = RequestState.WAITING, None, 0, []
            req.sample_steps.clear()
            req.num_recoveries += 1
            if req.num_recoveries > max_recoveries:
                req.state, req.finish_reason = RequestState.FINISHED, FinishReason.ERROR
                del self.requests[req.request_id]
                failed.append(RequestOutput(req.request_id, [], [], True, FinishReason.ERROR))
            else:
                self.waiting.appendleft(req)
        return failed[::-1]

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.state is RequestState.RUNNING:
            self.running[req.rank].remove(req)
            self.pools[req.rank].release(req.block_ids)
            self._released[req.rank].append(req.request_id)
        req.state, req.finish_reason = RequestState.FINISHED, reason
        del self.requests[req.request_id]

    # ---- results back --------------------------------------------------------------------
    def update(self, results: list[StepResult]) -> list[RequestOutput]:
        """Take in the tokens of one step (the oldest in flight)."""
        outputs = []
        now = time.monotonic()
        for result in results:
            for tok in result.tokens:
                req = self.requests.get(tok.request_id)
                if req is None or req.state is not RequestState.RUNNING or req.sample_steps[:1] != [result.step]:
                    continue  # aborted, finished or preempted (maybe running again) while the step was in flight
                req.sample_steps.pop(0)
                req.output_token_ids.append(tok.token_id)
                req.output_logprobs.append(tok.logprob)
                req.first_token_time = req.first_token_time or now
                reason = self._stop_reason(req, tok.token_id)
                if reason is not None:
                    self._finish(req, reason)
                outputs.append(RequestOutput(req.request_id, [tok.token_id], [tok.logprob],
                                             reason is not None, reason, tok.logits))
        return outputs

    def _stop_reason(self, req: Request, token_id: int) -> FinishReason | None:
        s = req.sampling
        if not s.ignore_eos and token_id in self.limits.eos_token_ids:
            return FinishReason.EOS
        if token_id in s.stop_token_ids:
            return FinishReason.STOP
        if self._length_done(req, len(req.output_token_ids)):
            return FinishReason.LENGTH
        return None

    def _length_done(self, req: Request, outputs: int) -> bool:
        """Whether `outputs` output tokens end the request by max_tokens or the context length."""
        return outputs >= req.sampling.max_tokens or len(req.prompt_token_ids) + outputs >= self.limits.max_model_len

    # ---- what the status endpoints show --------------------------------------------------
    def kv_usage(self) -> list[tuple[int, int]]:
        """(used, total) KV blocks per attention rank."""
        return [(p.num_used, p.num_blocks) for p in self.pools]
