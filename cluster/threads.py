"""How many torch threads a rank runs: the one policy, used by the deployment, the ranks and the tuner.

A node's cores are split among the ranks placed on it:

- With one micro-batch the attention side and the expert side take turns (the expert ranks wait
  for the dispatch, the attention ranks for the combine), so each side may use all the cores it
  finds: a node with `a` attention and `e` expert ranks gives each `cores // max(a, e)` threads.
- With two or more micro-batches both sides compute at once and share the cores:
  `cores // (a + e)` each. Oversubscribing the cores costs more than it gains.
- Always at least one thread.

Two refinements, both for CPU deployments where the sides take turns on few cores:

- Small models (the fused gate-up expert matrix under `THREADED_MIN_ELEMENTS` elements) run one thread
  per rank whatever the cores: their GEMMs are too small to pay for waking and joining threads.
- Small steps: an attention rank that shares its CPU node with an expert rank at one micro-batch
  runs the layers of decode-sized steps on one thread. That work is small ops that gain little
  from a second thread, and an idle OpenMP thread spins on the cores the expert rank needs next.
  The LM head and prefill-sized steps keep every thread.

A `threads_per_rank` the user sets wins over every rule here. docs/tuning.md has the measurements
behind the rules. Pure functions of plain numbers: no torch and no other module of ours, so the
torch-free tuner and the ranks read the same rule.
"""

from __future__ import annotations

# Elements of a model's largest expert matrix (the fused gate-up, [2·expert_intermediate, hidden]) from
# which a rank gains from a second thread.
THREADED_MIN_ELEMENTS = 1 << 18


def rank_threads(cores: int, attention_ranks: int, expert_ranks: int, micro_batches: int,
                 threads_per_rank: int = 0) -> int:
    """Threads for each rank on a node with `cores` cores holding `attention_ranks` and `expert_ranks`
    ranks (those on this node, not the deployment's totals where it spans nodes)."""
    if threads_per_rank:
        return threads_per_rank
    take_turns = attention_ranks and expert_ranks and micro_batches == 1
    busy = max(attention_ranks, expert_ranks) if take_turns else attention_ranks + expert_ranks
    return max(1, cores // max(1, busy))


def useful_threads(threads: int, hidden_size: int, expert_intermediate: int, threads_per_rank: int = 0) -> int:
    """How many of `threads` a rank of a model with these dimensions can use: 1 for small models
    (fused gate-up matrix under THREADED_MIN_ELEMENTS), all of them otherwise or where the user fixed
    the count."""
    if threads_per_rank or 2 * expert_intermediate * hidden_size >= THREADED_MIN_ELEMENTS:
        return threads
    return 1


def small_step_threads(device: str, micro_batches: int, expert_ranks: int, threads_per_rank: int = 0,
                       colocated: bool = False) -> int | None:
    """Threads for an attention rank's layers in decode-sized steps, on a node of `device` ("cpu",
    "cuda") holding `expert_ranks` expert ranks; None: the rank's usual count. Colocated ranks share
    one process, where OpenMP's thread count is one setting for every thread: one count for all."""
    if threads_per_rank or device != "cpu" or micro_batches != 1 or not expert_ranks or colocated:
        return None
    return 1
