"""A fake deployment for server tests: an Engine over fake attention ranks, a tokenizer, a ServedModel."""

from __future__ import annotations

import threading
import time

from scheduler.config import EngineConfig, EngineLimits
from scheduler.engine import Engine, FaultyRank, InProcessRanks, RankFault
from scheduler.messages import PENDING_TOKEN, SampledToken, StepResult
from serving.server import ServedModel

VOCAB = 768


def fake_token(last_token: int, position: int) -> int:
    """Deterministic 'model': the next token follows from the last one and its position (never 0 = EOS)."""
    return 1 + (last_token * 7 + position * 13) % (VOCAB - 1)


class FakeRanks(InProcessRanks):
    """Attention ranks that sample `fake_token`; optional per-step delay, a step that fails, a step that
    hangs (until shutdown, as on a stopped rank), and the faults `probe` reports."""

    def __init__(self, step_s: float = 0.0, fail_at_step: int | None = None, hang_at_step: int | None = None,
                 faults: tuple[FaultyRank, ...] = ()):
        """A hung step ends when the ranks shut down, or raises RankFault once `fence` is called;
        `recover` gives healthy ranks (no fault, no hang, no state) and counts."""
        self.fenced = threading.Event()
        self.recoveries = 0
        self.step_s = step_s
        self.fail_at_step = fail_at_step
        self.hang_at_step = hang_at_step
        self.faults = list(faults)
        self.probes = 0
        self.hung_at: float | None = None   # when the hanging step started (time.monotonic())
        self.released: list[str] = []
        self.last: dict[str, int] = {}     # what a real attention rank keeps to feed PENDING_TOKEN
        self.shut = threading.Event()

    def run_step(self, plans):
        if self.step_s:
            time.sleep(self.step_s)
        if self.hang_at_step is not None and plans[0].step >= self.hang_at_step:
            self.hung_at = time.monotonic()
            while not (self.shut.is_set() or self.fenced.wait(0.01)):
                pass
            if self.fenced.is_set():
                raise RankFault(f"step {plans[0].step}: expert rank 0 was fenced (injected)")
            raise RuntimeError(f"step {plans[0].step}: expert rank 0 (10.1.2.3:29500) timed out (injected)")
        if self.fail_at_step is not None and plans[0].step >= self.fail_at_step:
            raise RuntimeError(f"step {plans[0].step}: attention rank 0 died (injected)")
        results = []
        for rank, plan in enumerate(plans):
            self.released += plan.released
            tokens = []
            for k in range(plan.decode_steps):          # more than one: each pass feeds the last one's tokens
                for c in (c for mb in plan.micro_batches for c in mb if c.sample):
                    last = self.last[c.request_id] if k or c.token_ids[-1] == PENDING_TOKEN else c.token_ids[-1]
                    tokens.append(SampledToken(c.request_id, fake_token(last, c.context_len + k), -0.5))
                    self.last[c.request_id] = tokens[-1].token_id
            results.append(StepResult(plan.step, rank, tokens))
        return results

    def probe(self, timeout_s):
        self.probes += 1
        return list(self.faults)

    def fence(self, faults):
        self.fenced.set()

    def recover(self):
        self.recoveries += 1
        self.hang_at_step = self.fail_at_step = None
        self.faults = []
        self.last.clear()            # new ranks know nothing
        self.fenced.clear()

    def shutdown(self):
        self.shut.set()


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(fake_token(seq[-1], len(seq)))
    return seq[len(prompt):]


def fake_engine(step_s=0.0, fail_at_step=None, eos=(), max_len=256, blocks=64, hang_at_step=None, faults=(),
                **cfg) -> Engine:
    config = EngineConfig(**{"block_size": 4, "attention_ranks": 2, "max_num_seqs": 8, **cfg})
    limits = EngineLimits(max_model_len=max_len, kv_blocks_per_rank=blocks, block_size=4, vocab_size=VOCAB,
                          eos_token_ids=tuple(eos))
    return Engine(config, limits, FakeRanks(step_s, fail_at_step, hang_at_step, faults))


_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        from models.embedded import build_tokenizer
        _TOKENIZER.append(build_tokenizer())
    return _TOKENIZER[0]


def served_model(engine: Engine, with_tokenizer: bool = True) -> ServedModel:
    return ServedModel(name="fake", family="mixtral", vocab_size=VOCAB, max_model_len=engine.limits.max_model_len,
                       eos_token_ids=engine.limits.eos_token_ids, num_layers=2, num_experts=4, experts_per_token=2,
                       hidden_size=8, dtype="float32", expert_owner=(0, 0, 0, 0),
                       tokenizer=tokenizer() if with_tokenizer else None)
