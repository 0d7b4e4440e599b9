"""Cost-model fits, the simulation of one decode iteration, profiles and catalogue files."""

import json
import random

import pytest

from cluster.threads import rank_threads, small_step_threads, useful_threads
from models.spec import spec_from_config
from tuner.costs import RooflineCosts, experts_hit
from tuner.fit import best_fit, features, fit_form
from tuner.hardware import BUILTIN, load_catalogue
from tuner.local import search_local
from tuner.model_shape import PRESETS, ModelShape
from tuner.profile import Profile
from tuner.search import InfeasibleError, Requirements
from tuner.simulate import SimPlan, simulate
from tuner.trace import spans_from_trace
from scheduler.messages import TraceEvent

TINY = ModelShape("tiny", num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=8,
                  top_k=2, expert_intermediate=512, vocab_size=1000)


def test_fit_recovers_the_generating_form_and_reports_quality():
    rng = random.Random(0)
    samples = [(features(b=b, **{"b*ctx": b * c}), (300 + 20 * b + 0.05 * b * c) * 1e-6 * rng.uniform(0.98, 1.02))
               for b in (1, 2, 4, 8, 16, 32) for c in (16, 128, 512)]
    f = best_fit(samples, [("b", "1"), ("b", "b*ctx", "1")], "T_a")
    assert f.terms == ("b", "b*ctx", "1")
    assert f.coef[0] == pytest.approx(20e-6, rel=0.1) and f.coef[2] == pytest.approx(300e-6, rel=0.1)
    assert f.r2 > 0.99 and f.mean_rel_err < 0.03 and f.loo_rel_err < 0.05
    plain = fit_form(samples, ("b", "1"))
    assert plain.loo_rel_err > f.loo_rel_err            # the KV term earns its place


def test_fit_never_keeps_negative_terms():
    samples = [(features(b=b), 1e-3 - 1e-6 * b) for b in range(1, 10)]  # time falls with b: the b term is dropped
    f = fit_form(samples, ("b", "1"))
    assert f.terms == ("1",) and f.coef[0] > 0


def test_experts_hit_grows_to_all_experts():
    assert experts_hit(1, 8, 2, 8) == pytest.approx(2.0)
    assert experts_hit(1000, 8, 2, 8) == pytest.approx(8.0)
    assert experts_hit(4, 16, 2, 4) < experts_hit(8, 16, 2, 4) < 4


def _costs(shape=TINY, gpu="H100", tp=1):
    return RooflineCosts(shape, BUILTIN[gpu], tp)


def test_simulation_orders_work_like_the_engine_and_overlaps_with_two_micro_batches():
    one = simulate(SimPlan(TINY, 1, 1, 1, 64, 256, _costs(), _costs()))
    two = simulate(SimPlan(TINY, 1, 1, 2, 64, 256, _costs(), _costs()))
    # every rank does each (layer, micro-batch) once; one LM head over the whole step last
    att = [s for s in two.spans if s.lane == "attention 0"]
    assert [(s.layer, s.micro_batch) for s in att] == [(l, j) for l in range(4) for j in range(2)] + [(4, -1)]
    assert len([s for s in two.spans if s.lane == "expert 0"]) == 8
    # with m = 1 attention and experts take turns; with m = 2 they overlap in time
    def overlap(r):
        a = [s for s in r.spans if s.lane.startswith("attention") and s.kind == "attention"]
        e = [s for s in r.spans if s.lane.startswith("expert")]
        return sum(max(0.0, min(x.end, y.end) - max(x.start, y.start)) for x in a for y in e)
    assert overlap(one) == 0.0 and overlap(two) > 0.0
    # causality: an expert span starts only after its dispatch arrived
    for e in (s for s in two.spans if s.kind == "expert"):
        d = [s for s in two.spans if s.kind == "dispatch" and (s.layer, s.micro_batch) == (e.layer, e.micro_batch)]
        assert e.start >= max(s.end for s in d) - 1e-12


def test_simulation_matches_the_closed_form_when_balanced():
    """The paper's formula: (T_a + T_e + 2T_c) + T_f(mL - 1) once the pipeline is saturated."""
    class Fixed(RooflineCosts):
        def attention(self, b, ctx): return 1e-3
        def expert(self, pairs, hits): return 1e-3
        def transfer(self, nbytes): return 0.2e-3
        def head(self, b): return 0.0
        def overhead(self, batch): return 0.0
    c = Fixed(TINY, BUILTIN["H100"], 1)
    for m in (3, 4):
        r = simulate(SimPlan(TINY, 1, 1, m, 64, 100, c, c))
        assert r.iteration_s == pytest.approx((1e-3 + 1e-3 + 0.4e-3) + 1e-3 * (m * 4 - 1))


def test_skewed_expert_load_slows_the_iteration():
    shape = PRESETS["mixtral-8x22b"]
    base = SimPlan(shape, 8, 4, 2, 4096, 128, _costs(shape), _costs(shape))    # compute-bound experts
    uniform = simulate(base, record=False)
    skewed = simulate(SimPlan(**{**base.__dict__, "skew": 1.2}), record=False)
    assert skewed.iteration_s > uniform.iteration_s * 1.2
    hot = max(v for k, v in skewed.busy.items() if k.startswith("expert"))
    cold = min(v for k, v in skewed.busy.items() if k.startswith("expert"))
    assert hot > 2 * cold


def test_shared_host_cores_slow_concurrent_ranks():
    profile = _synthetic_profile(cores=2)
    alone = profile.predict(1, 1, 2, 16, 64, threads=1)
    crowded = profile.predict(2, 2, 2, 16, 64, threads=1)      # 4 single-thread ranks on 2 cores
    per_rank_work = sum(crowded.busy.values())
    assert crowded.iteration_s > per_rank_work / 4 * 1.5              # not 4 ranks running freely
    assert rank_threads(2, 1, 1, 1) == 2 and rank_threads(2, 1, 1, 2) == 1 and rank_threads(2, 2, 3, 2) == 1
    small = ModelShape("small", 2, 64, 4, 2, 16, 8, 2, 96, 256)            # too small for threads to help
    assert useful_threads(2, small.hidden_size, small.expert_intermediate) == 1
    assert useful_threads(2, TINY.hidden_size, TINY.expert_intermediate) == 2


def test_thread_policy_splits_a_nodes_cores_among_its_ranks():
    assert rank_threads(8, 2, 1, 1) == 4 and rank_threads(8, 2, 1, 2) == 2      # take turns / share at once
    assert rank_threads(8, 3, 0, 1) == 2 and rank_threads(8, 0, 0, 1) == 8      # a node with one side only
    assert rank_threads(2, 4, 4, 2) == 1 and rank_threads(8, 2, 2, 2, threads_per_rank=3) == 3
    assert useful_threads(4, 64, 96, threads_per_rank=4) == 4                   # the user's count wins
    assert small_step_threads("cpu", 1, expert_ranks=1) == 1
    assert small_step_threads("cpu", 2, expert_ranks=1) is None                  # both sides busy at once
    assert small_step_threads("cpu", 1, expert_ranks=0) is None                  # no expert rank beside it
    assert small_step_threads("cuda", 1, expert_ranks=1) is None
    assert small_step_threads("cpu", 1, expert_ranks=1, threads_per_rank=2) is None


def _synthetic_profile(cores=2) -> Profile:
    p = Profile(TINY, "float32", cores, "test machine")
    for t, speed in ((1, 1.0), (2, 1.7)):
        p.samples["attention"][str(t)] = [(b, c, (400 + 15 * b + 0.02 * b * c) * 1e-6 / speed) for b in (1, 4, 16, 32) for c in (16, 128)]
        p.samples["expert"][str(t)] = [(2 * b, experts_hit(b, 8, 2, 8), (200 + 3 * 2 * b + 60 * experts_hit(b, 8, 2, 8)) * 1e-6 / speed)
                                       for b in (1, 2, 4, 8, 16, 32)]
        p.samples["head"][str(t)] = [(b, (100 + 5 * b) * 1e-6) for b in (1, 4, 16, 32)]
    p.samples["transfer"] = [(n, 100e-6 + n / 2e9) for n in (1e3, 1e4, 1e5, 1e6)]
    p.samples["overhead"] = [(b, 2e-3 + 1e-5 * b) for b in (1, 4, 16, 32)]
    return p.fit()


def test_profile_round_trips_through_a_file(tmp_path):
    p = _synthetic_profile()
    path = tmp_path / "profile.json"
    p.save(str(path))
    q = Profile.load(str(path))
    assert q.threads == [1, 2]
    assert q.costs(2).attention(8, 100) == pytest.approx(p.costs(2).attention(8, 100))
    assert q.costs(3).attention(8, 100) == pytest.approx(p.costs(2).attention(8, 100))   # nearest profiled below
    assert any("T_a" in line and "R²" in line for line in q.report())
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a shuttle-profile/1 file"):
        Profile.load(str(tmp_path / "bad.json"))


def test_local_search_picks_the_fastest_simulated_shape():
    profile = _synthetic_profile()
    req = Requirements(tpot_slo_s=0.05, ctx=64, allow_m1=True, balance_limit=10)
    result = search_local(profile, req, max_attention=2, max_expert=2, batches=(4, 8, 16, 32))
    best = result.best
    assert best.t_iter <= 0.05
    brute = max(((a, e, m, b) for a in (1, 2) for e in (1, 2) for m in (1, 2, 3, 4) for b in (4, 8, 16, 32) if b >= a * m),
                key=lambda s: (b := s[3]) / profile.predict(*s, 64, record=False).iteration_s
                if profile.predict(*s, 64, record=False).iteration_s <= 0.05 else 0)
    assert best.tokens_per_s == pytest.approx(brute[3] / profile.predict(*brute, 64, record=False).iteration_s)
    with pytest.raises(InfeasibleError, match="TPOT SLO"):
        search_local(profile, Requirements(tpot_slo_s=1e-4, ctx=64, allow_m1=True))


def test_catalogue_file_overrides_and_extends(tmp_path):
    f = tmp_path / "gpus.yaml"
    f.write_text("gpus:\n  H20: {price: 0.3}\n  MyGPU: {memory_gb: 64, bandwidth_gbs: 2000, bf16_tflops: 400, price: 0.6}\n")
    cat = load_catalogue(str(f), include_local=False)
    assert cat["H20"].price == 0.3 and cat["H20"].bandwidth_gbs == BUILTIN["H20"].bandwidth_gbs
    assert cat["MyGPU"].memory_gb == 64
    f.write_text("gpus:\n  MyGPU: {memory_gb: 64, bandwith_gbs: 2000}\n")
    with pytest.raises(ValueError, match="unknown fields bandwith_gbs"):
        load_catalogue(str(f), include_local=False)
    f.write_text("gpus:\n  NewGPU: {memory_gb: 64}\n")
    with pytest.raises(ValueError, match="new GPU 'NewGPU' needs bandwidth_gbs, bf16_tflops, price"):
        load_catalogue(str(f), include_local=False)


def test_model_shape_from_the_loaders_spec_and_presets():
    cfg = {"model_type": "mixtral", "num_attention_heads": 8, "hidden_size": 512, "num_local_experts": 16, "intermediate_size": 1024,
           "num_hidden_layers": 8, "num_key_value_heads": 2, "num_experts_per_tok": 2, "vocab_size": 32000}
    s = ModelShape.from_spec(spec_from_config(cfg))
    assert (s.num_experts, s.top_k, s.head_dim, s.expert_intermediate) == (16, 2, 64, 1024)
    with pytest.raises(ValueError, match="not a MoE model"):
        spec_from_config({**cfg, "num_local_experts": None})
    sizes = {k: v.total_params() / 1e9 for k, v in PRESETS.items()}
    assert 125 < sizes["dbrx-132b"] < 140 and 305 < sizes["scaled-moe-317b"] < 325


def test_measured_trace_becomes_spans_with_derived_transfers():
    ev = [TraceEvent("attention", 0, 5, 0, 0, "attention", 10.000, 10.001),
          TraceEvent("expert", 0, 5, 0, 0, "expert", 10.0012, 10.0020),
          TraceEvent("attention", 0, 5, 0, 0, "wait", 10.0011, 10.0023),
          TraceEvent("attention", 0, 5, -1, 0, "lm_head", 10.0023, 10.0030)]
    spans, wall = spans_from_trace(ev)
    kinds = {s.kind: s for s in spans}
    assert set(kinds) == {"attention", "expert", "wait", "head", "dispatch", "combine"}
    assert kinds["dispatch"].start == pytest.approx(0.001) and kinds["dispatch"].end == pytest.approx(0.0012)
    assert kinds["combine"].end == pytest.approx(0.0023)
    assert wall == pytest.approx(0.003)
    with pytest.raises(ValueError, match="trace is empty"):
        spans_from_trace([])


def test_interference_only_touches_ranks_that_overlap_or_crowd_the_cores():
    profile = _synthetic_profile(cores=2)
    base = {s: profile.predict(*s, 64, record=False).iteration_s for s in ((1, 1, 1, 16), (1, 1, 2, 16), (2, 2, 2, 32))}
    profile.interference = {"overlap_slowdown": 0.5, "wakeup_latency_s": 1e-3}
    after = {s: profile.predict(*s, 64, record=False).iteration_s for s in base}
    assert after[(1, 1, 1, 16)] == pytest.approx(base[(1, 1, 1, 16)])    # the two sides take turns: nothing overlaps
    assert after[(1, 1, 2, 16)] > base[(1, 1, 2, 16)] * 1.05                # ping-pong: both sides compute at once
    assert after[(2, 2, 2, 32)] > base[(2, 2, 2, 32)] * 1.05


def test_calibration_recovers_the_interference_that_made_the_runs(tmp_path):
    truth = {"overlap_slowdown": 0.3, "wakeup_latency_s": 0.5e-3}
    profile = _synthetic_profile(cores=2)
    profile.interference = dict(truth)
    shapes = [(1, 2, 1, 8), (1, 1, 2, 16), (2, 1, 1, 8), (2, 2, 2, 32)]
    profile.samples["calibration"] = [[*s, 64, profile.predict(*s, 64, record=False).iteration_s] for s in shapes]
    profile.calibrate()
    got = profile.interference
    assert got["runs"] == 4 and got["mean_abs_log_error"] < 0.01
    for s, (*_, t) in zip(shapes, profile.samples["calibration"]):
        assert profile.predict(*s, 64, record=False).iteration_s == pytest.approx(t, rel=0.02)
    assert got["overlap_slowdown"] == pytest.approx(0.3, abs=0.05)
    assert got["wakeup_latency_s"] == pytest.approx(0.5e-3, abs=0.1e-3)
    assert any("interference: cores shared, compute spans x1.00" in line and "overlap slowdown 0.30 (fitted)" in line
               for line in profile.report())
    path = tmp_path / "p.json"                                   # saved with the profile, not refitted on load
    profile.save(str(path))
    assert Profile.load(str(path)).interference == got


def test_samples_taken_in_a_slow_spell_are_rescaled_to_the_reference_speed(tmp_path):
    clean = _synthetic_profile()
    noisy = _synthetic_profile()
    # The machine ran at half speed while three attention samples were taken (their probe took twice as
    # long, their stage times too), and at the usual speed for the rest.
    slow = [0, 3, 5]
    key = "1"
    for i in slow:
        b, c, y = noisy.samples["attention"][key][i]
        noisy.samples["attention"][key][i] = (b, c, 2 * y)
    stamps = [(16e-3 if i in slow else 8e-3, [("attention", key, i)]) for i in range(len(noisy.samples["attention"][key]))]
    stamps.append((8e-3, [("transfer", None, 0), ("overhead", None, 0)]))
    noisy.rescale_to_reference(stamps).fit()
    assert noisy.speed == {"reference_s": 8e-3, "probes": 9, "range_s": [8e-3, 16e-3], "rescaled": True}
    for (b, c, y), (_, _, want) in zip(noisy.samples["attention"][key], clean.samples["attention"][key]):
        assert y == pytest.approx(want)
    assert noisy.costs(1).attention(8, 100) == pytest.approx(clean.costs(1).attention(8, 100))
    assert noisy.speed_factor(12e-3) == pytest.approx(1.5) and noisy.speed_factor(None) == 1.0
    assert clean.speed_factor(12e-3) == 1.0                        # a profile without probes: no rescaling
    assert any("reference probe 8.00 ms" in line for line in noisy.report())
    path = tmp_path / "p.json"
    noisy.save(str(path))
    assert Profile.load(str(path)).speed == noisy.speed
    with pytest.raises(ValueError, match="positive"):
        clean.rescale_to_reference([(0.0, [("attention", key, 0)])])
    recorded = _synthetic_profile().rescale_to_reference(stamps, apply=False)     # record the speed, keep the times
    assert recorded.samples["attention"][key] == _synthetic_profile().samples["attention"][key]
    assert recorded.speed["reference_s"] == 8e-3 and not recorded.speed["rescaled"]


def test_speed_probe_times_its_fixed_workload():
    from tuner.speed import speed_probe
    import torch
    threads = torch.get_num_threads()
    t = speed_probe(repeats=3)
    assert 1e-5 < t < 1.0
    assert torch.get_num_threads() == threads                      # restored
    with pytest.raises(ValueError, match="repeats"):
        speed_probe(repeats=0)


def test_a_measured_contention_fixes_the_slowdown_and_calibration_fits_the_wakeup():
    truth = {"overlap_slowdown": 0.25, "wakeup_latency_s": 1.2e-3, "compute_scale": 1.3}
    profile = _synthetic_profile(cores=2)
    profile.interference = dict(truth)
    shapes = [(1, 2, 1, 8), (1, 1, 2, 16), (2, 1, 1, 8), (2, 2, 2, 32)]
    profile.samples["calibration"] = [[*s, 64, profile.predict(*s, 64, record=False).iteration_s] for s in shapes]
    profile.samples["contention"] = {"alone_s": 8e-3, "together_s": 10e-3, "slowdown": 0.25}
    profile.calibrate()
    got = profile.interference
    assert got["overlap_slowdown"] == 0.25 and got["slowdown_from"] == "measured"
    assert got["wakeup_latency_s"] == pytest.approx(1.2e-3, abs=0.05e-3)
    assert got["compute_scale"] == pytest.approx(1.3) and got["mean_abs_log_error"] < 1e-9
    assert any("0.25 (measured)" in line and "x1.30" in line for line in profile.report())


def test_passes_taken_at_different_times_merge_into_their_medians():
    passes = []
    for factor in (1.0, 1.5, 0.9):                  # the machine's speed in each pass
        p = _synthetic_profile()
        for key in p.samples["attention"]:
            p.samples["attention"][key] = [(b, c, y * factor) for b, c, y in p.samples["attention"][key]]
        p.samples["calibration"] = [[1, 2, 1, 8, 64.0, 0.03 * factor]]
        p.samples["contention"] = {"alone_s": 8e-3, "together_s": 9e-3, "slowdown": 0.1 * factor}
        passes.append(p)
    merged = Profile.merge(passes).fit()
    clean = _synthetic_profile()
    for (b, c, y), (_, _, want) in zip(merged.samples["attention"]["1"], clean.samples["attention"]["1"]):
        assert y == pytest.approx(want)             # the median pass is the one at speed 1.0
    assert merged.samples["calibration"] == [[1, 2, 1, 8, 64.0, pytest.approx(0.03)]]
    assert merged.samples["contention"]["slowdown"] == pytest.approx(0.1)
    assert merged.costs(1).attention(8, 100) == pytest.approx(clean.costs(1).attention(8, 100))
    assert "median of 3 passes" in merged.report()[0]
    short = _synthetic_profile()
    short.samples["transfer"] = short.samples["transfer"][:2]
    with pytest.raises(ValueError, match="same grid"):
        Profile.merge([passes[0], short])
    with pytest.raises(ValueError, match="no profiles"):
        Profile.merge([])


def test_calibration_reads_the_compute_scale_and_slowdown_off_the_runs_spans():
    # queued cores: a rank that sends frees its core for the receiver, so no wake-up latency applies
    truth = {"overlap_slowdown": 0.2, "wakeup_latency_s": 0.0, "compute_scale": 1.25, "core_policy": "queue"}
    profile = _synthetic_profile(cores=2)
    shapes = [(1, 2, 1, 8), (1, 1, 2, 16), (2, 1, 1, 8), (2, 2, 2, 32)]
    profile.interference = dict(truth)
    profile.samples["calibration"] = [[*s, 64, profile.predict(*s, 64, record=False).iteration_s] for s in shapes]
    spans = []
    for a, e, m, b in shapes:      # spans the runs would show: alone-time × scale, × (1 + slowdown) when the sides overlap
        att, exp = profile.alone_times(a, e, m, b, 64)
        factor = 1.25 * (1.2 if m > 1 else 1.0)
        spans.append([factor * att, factor * exp])
    profile.samples["calibration_spans"] = spans
    profile.samples["contention"] = {"alone_s": 8e-3, "together_s": 16e-3, "slowdown": 1.0}   # ignored: spans win
    profile.calibrate()
    got = profile.interference
    assert got["slowdown_from"] == "spans"
    assert got["compute_scale"] == pytest.approx(1.25) and got["overlap_slowdown"] == pytest.approx(0.2)
    assert got["core_policy"] == "queue" and got["wakeup_latency_s"] == 0.0
    assert got["mean_abs_log_error"] < 1e-6
    assert any("from the runs' spans" in line and "cores queued" in line for line in profile.report())


def test_queued_cores_run_at_most_as_many_spans_as_cores_at_full_speed():
    profile = _synthetic_profile(cores=2)
    profile.interference = {"overlap_slowdown": 0.0, "wakeup_latency_s": 0.0, "core_policy": "queue"}
    queued = profile.predict(2, 2, 2, 16, 64, threads=1)        # 4 single-thread ranks on 2 cores
    compute = [s for s in queued.spans if s.kind in ("attention", "expert", "head")]
    for s in compute:                                                    # never more than 2 at once
        assert sum(1 for o in compute if o.start < s.start + 1e-12 < o.end) <= 2
    by_lane = {}
    for s in compute:
        by_lane.setdefault(s.lane, 0.0)
        by_lane[s.lane] += s.end - s.start
    for lane, busy in queued.busy.items():                              # each span ran at full speed
        assert by_lane[lane] == pytest.approx(busy)
    profile.interference["core_policy"] = "share"
    shared = profile.predict(2, 2, 2, 16, 64, threads=1)
    assert sum(s.end - s.start for s in shared.spans if s.kind == "attention") > \
        sum(s.end - s.start for s in compute if s.kind == "attention") * 1.2   # shared: spans stretch instead
