"""Discrete-event simulation of one decode iteration: per rank, per micro-batch, per layer.

What runs, in the order the engine runs it (attention_node/forward.py `run_pingpong`):
- attention rank a: A(0,0) A(0,1) … A(0,m-1) A(1,0) … A(L-1,m-1) H, where A(l,j) is layer l of
  micro-batch j (attention, router, dispatch launch) and H the LM head and sampling over all the
  rank's rows (attention_node/rank.py runs it once per step); A(l,j) for l > 0 waits for the
  combine of (l-1, j) from every expert rank, H for (L-1, j) of every j.
- expert rank e: E(0,0) E(0,1) … in (layer, micro-batch) order; E(l,j) waits for the dispatch of
  (l, j) from every attention rank (an empty message still counts).
- a dispatch (a → e) arrives T_c(bytes) after A(l,j) ends; a combine (e → a) T_c after E(l,j) ends.
- ranks that share a host (the CPU profile: `StageCosts.shared_host_cores`) share its cores, by
  one of two policies (`StageCosts.core_policy`, chosen by calibration): "share" — while the running
  tasks want more threads than there are cores, each runs slower in proportion (processor sharing);
  "queue" — a task that becomes ready while its threads do not fit on the free cores waits, earliest
  ready first, until a running span ends (what the OS does with spans shorter than its time slice:
  the running rank keeps its core, the woken one waits). On GPUs each rank has its own devices.
- interference measured on a shared host (`StageCosts.overlap_slowdown`, `wakeup_latency_s`, both 0
  unless a profile calibrated them): while k ranks compute at once each runs 1 + s·(k-1) times
  slower; a message sent while the other ranks' computing threads fill every core arrives
  `wakeup_latency_s` later (no idle core runs the transport's thread and wakes the receiver until
  the scheduler preempts someone).
Skewed expert load: expert popularity ∝ 1/(i+1)^skew (skew 0 = uniform), experts placed on ranks
in contiguous blocks as `scheduler/placement.py` does; the hottest rank then paces the experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.costs import StageCosts, token_bytes
from tuner.model_shape import ModelShape


@dataclass(frozen=True)
class Span:
    lane: str           # "attention 0", "expert 1", "transfer"
    kind: str           # "attention", "head", "expert", "dispatch", "combine"
    layer: int
    micro_batch: int
    start: float
    end: float


@dataclass
class SimResult:
    iteration_s: float
    batch: int
    spans: list[Span] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)     # lane → seconds of work

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.iteration_s


@dataclass(frozen=True)
class SimPlan:
    shape: ModelShape
    n_a: int
    n_e: int
    m: int
    batch: int                    # B, over all attention ranks
    ctx: float                    # mean context length of the decoding sequences
    attention_costs: StageCosts
    expert_costs: StageCosts
    dtype_bytes: int = 2
    threads_a: int = 1            # per rank, for processor sharing on a shared host
    threads_e: int = 1
    skew: float = 0.0


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def expert_popularity(num_experts: int, skew: float) -> list[float]:
    w = [1.0 / (i + 1) ** skew for i in range(num_experts)]
    total = sum(w)
    return [x / total for x in w]


def owners(num_experts: int, n_e: int) -> list[list[int]]:
    sizes = split(num_experts, n_e)
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def simulate(plan: SimPlan, record: bool = True) -> SimResult:
    s = plan.shape
    L, m, k, E = s.moe_layers, plan.m, s.top_k, s.num_experts
    b = [split(ba, m) for ba in split(plan.batch, plan.n_a)]          # b[a][j] sequences
    tokens_j = [sum(b[a][j] for a in range(plan.n_a)) for j in range(m)]
    pop = expert_popularity(E, plan.skew)
    own = owners(E, plan.n_e)
    p_pick = [min(1.0, k * w) for w in pop]                           # P(a token picks expert x)
    share = [sum(pop[x] for x in own[e]) for e in range(plan.n_e)]
    p_rank = [1.0 - (1.0 - min(1.0, sh)) ** k for sh in share]        # P(a token goes to rank e)
    tb = token_bytes(s, plan.dtype_bytes)
    ca, ce = plan.attention_costs, plan.expert_costs
    t_a = [[ca.attention(b[a][j], plan.ctx) for j in range(m)] for a in range(plan.n_a)]
    t_h = [ca.head(sum(b[a])) for a in range(plan.n_a)]
    t_e = [[ce.expert(tokens_j[j] * k * share[e], sum(1.0 - (1.0 - p_pick[x]) ** tokens_j[j] for x in own[e]))
            for j in range(m)] for e in range(plan.n_e)]
    t_c = [[[ca.transfer(b[a][j] * p_rank[e] * tb) for j in range(m)] for e in range(plan.n_e)] for a in range(plan.n_a)]

    # Each rank's program: a list of (kind, layer, micro_batch, work seconds).
    programs: dict[str, list] = {}
    for a in range(plan.n_a):
        programs[f"attention {a}"] = ([("attention", l, j, t_a[a][j]) for l in range(L) for j in range(m)]
                                      + [("head", L, -1, t_h[a])])
    for e in range(plan.n_e):
        programs[f"expert {e}"] = [("expert", l, j, t_e[e][j]) for l in range(L) for j in range(m)]
    threads = {lane: plan.threads_a if lane.startswith("attention") else plan.threads_e for lane in programs}
    cores = ca.shared_host_cores
    slowdown = ca.overlap_slowdown if cores else 0.0
    wakeup = ca.wakeup_latency_s if cores else 0.0
    queueing = bool(cores) and ca.core_policy == "queue"

    dispatch_at: dict[tuple, float] = {}     # (a, e, l, j) → arrival time at expert e
    combine_at: dict[tuple, float] = {}      # (e, a, l, j) → arrival time at attention a
    spans: list[Span] = []
    pos = {lane: 0 for lane in programs}
    running: dict[str, list] = {}            # lane → [kind, l, j, remaining work, start]
    busy = {lane: 0.0 for lane in programs}
    now = 0.0

    def ready_at(lane: str, kind: str, l: int, j: int) -> float | None:
        """When the task's inputs are all there (None: some input is not even sent yet)."""
        if kind == "expert":
            e = int(lane.split()[1])
            keys = [(a, e, l, j) for a in range(plan.n_a)]
            src = dispatch_at
        elif l == 0 and kind == "attention":
            return 0.0
        else:
            a = int(lane.split()[1])
            mbs = range(m) if j < 0 else (j,)           # the head waits for every micro-batch
            keys = [(e, a, l - 1, jj) for e in range(plan.n_e) for jj in mbs]
            src = combine_at
        if any(key not in src for key in keys):
            return None
        return max(src[key] for key in keys)

    def finish(lane: str, task: list, end: float) -> None:
        kind, l, j, _, start = task
        if record:
            spans.append(Span(lane, kind, l, j, start, end))
        idx = int(lane.split()[1])
        late = wakeup if wakeup and sum(threads[x] for x in running) >= cores else 0.0   # cores all busy
        if kind == "attention":
            for e in range(plan.n_e):
                arrive = end + t_c[idx][e][j] + late
                dispatch_at[(idx, e, l, j)] = arrive
                if record:
                    spans.append(Span("transfer", "dispatch", l, j, end, arrive))
        elif kind == "expert":
            for a in range(plan.n_a):
                arrive = end + t_c[a][idx][j] + late
                combine_at[(idx, a, l, j)] = arrive
                if record:
                    spans.append(Span("transfer", "combine", l, j, end, arrive))

    total_tasks = sum(len(p) for p in programs.values())
    done = 0
    while done < total_tasks:
        next_ready = float("inf")
        ready = []
        for lane, prog in programs.items():          # what can start
            if lane in running or pos[lane] >= len(prog):
                continue
            kind, l, j, work = prog[pos[lane]]
            t = ready_at(lane, kind, l, j)
            if t is None:
                continue
            if t <= now + 1e-15:
                ready.append((t, lane, kind, l, j, work))
            else:
                next_ready = min(next_ready, t)
        for t, lane, kind, l, j, work in sorted(ready):   # earliest ready first
            if queueing and running and sum(threads[x] for x in running) + threads[lane] > cores:
                continue                              # no free core: it waits for a running span to end
            running[lane] = [kind, l, j, work, now]
            busy[lane] += work
            pos[lane] += 1
        if cores:
            want = sum(threads[lane] for lane in running)
            rate = min(1.0, cores / want) / (1.0 + slowdown * (len(running) - 1)) if want else 1.0
        else:
            rate = 1.0
        next_done = min((task[3] / rate for task in running.values()), default=float("inf"))
        dt = min(next_done, next_ready - now)
        if dt == float("inf"):
            raise RuntimeError("simulation deadlock: no task can run (a bug in the plan's program)")
        now += dt
        for lane in list(running):
            task = running[lane]
            task[3] -= dt * rate
            if task[3] <= 1e-12:
                del running[lane]
                finish(lane, task, now)
                done += 1
    iteration = now + ca.overhead(plan.batch)
    return SimResult(iteration_s=iteration, batch=plan.batch, spans=spans, busy=busy)
