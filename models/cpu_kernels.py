"""Shuttle's CPU kernels (csrc/, float32 and bfloat16), built once per machine on first use.

Places where torch's own CPU ops measured far from what the machine can do:

- Decode attention from a paged cache: torch ops must first gather every context into a padded
  copy; at 64 sequences that gather (a write, then a second read of all of it, padding included)
  was most of the attention rank's time in a decode step. `paged_decode` walks each sequence's
  block table and reads each cached row once, up to that sequence's length (float32 or bfloat16
  caches; sums in float32; with AVX-512 each row as d/16 registers, four queries' scores reduced
  together, a head's scores, softmax and values back to back). Short prefill chunks go through it
  too, each row a decode token whose context ends at itself (attention_node/rank.py says when).
  `kv_write` puts a step's new K and V rows into the cache. `prefill_attention` does a longer
  prefill chunk's causal attention in one pass over its keys (online softmax; no [rows, C] scores
  written), where torch's matrix products wrote, scaled, masked and softmaxed the scores by separate ops.
- Few-row matrix products (decode and chunked prefill: 1-256 rows per expert), where oneDNN's
  prepacked GEMM (models/linear.py) stays far below the FLOP peak. `panel_linear` keeps a float32
  weight in 16-column panels (one AVX-512 register; 8 columns where the CPU has only AVX2): few
  rows run as one register tile per panel or pair of panels (one pass over the weight), more rows
  as tiles of up to 12 over two neighbouring panels, each tile's rows packed k-major first (one
  stream of broadcasts, not 12). bfloat16 weights, where
  the CPU has AVX-512 BF16, are kept in 16-column panels of k pairs that `vdpbf16ps` multiplies as
  they lie (half the bytes, twice the products per instruction). `grouped_panel_linear` runs a
  layer's experts, each on its own rows, in one parallel region; `moe_ffn` is a whole expert layer
  in one call (expert_node/experts.py).
- Small per-layer ops at decode sizes, where torch's dispatch costs more than the work: `rms_norm`,
  `rotary` (each rounding as the Hugging Face modules do), and the sampler's greedy pick `row_max`;
  `decode_block` runs a decode step's whole attention block of one layer (those ops, the projections,
  decode attention and the router's top-k) in one call from C++, bit-identical to the Python path;
  `DecodeLayers` runs every layer of a decode step, the expert layer included, in one call where a
  colocated node's attention rank and its one expert rank share the process, and its `greedy_steps`
  a rank call's decode steps of greedy requests (layers, LM head, pick, next inputs) in one call.
- The LM head at a few greedy rows: a third of a batch-1 decode step's bytes, of which a greedy
  request keeps one index. `screened_greedy` reads an int8 copy of the head with a proven bound per
  row and computes only the rows it cannot rule out from the real head (the head's own tiles, so
  the same token, bit for bit).

Measurements of each against torch: docs/performance.md.

No library we can depend on offers these for the CPU (vLLM's and IPEX's CPU kernels are pinned to
their own torch builds), so they are ~2000 lines of C++ built by `torch.utils.cpp_extension`, which
rebuilds only when the source changes; an flock (below) serialises ranks that start together. Threads come from
torch's own pool (`at::parallel_for`), so `torch.set_num_threads` governs them as it does every op.

The build needs a C++ compiler and takes ~20 s the first time; it is compiled for the machine it
runs on (-march=native; the build's folder names the CPU's feature flags, so a shared home
directory never hands one node another's binary). Where it cannot be built, or with
SHUTTLE_CPU_KERNELS=0, attention and linear layers use torch ops (oneDNN), and say so once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading

_lock = threading.Lock()
_built: dict = {}            # "ext" → the extension module, or None where it is unavailable

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(CSRC, name) for name in ("attention.cpp", "small_ops.cpp", "panels.cpp", "screen.cpp", "layer.cpp", "module.cpp")]
HEADERS = ("kernels.h", "tiles.h")
# Vectorised float reductions need reassociation; these allow that and nothing that changes how
# infinities or NaNs behave (unlike -ffast-math).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build_directory() -> str:
    """Where the build lives: $TORCH_EXTENSIONS_DIR or ~/.cache/shuttle/kernels, then one folder per
    torch version, Python version and CPU (a build is only good for all three)."""
    import torch
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "shuttle", "kernels")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(base, f"cpu_kernels-torch{torch.__version__}-{py}-{_cpu_tag()}")


def _build():
    from torch.utils.cpp_extension import load
    folder = build_directory()
    os.makedirs(folder, exist_ok=True)
    # torch's own build lock is a file that stays behind when a build is killed (a rank stopped
    # mid-build), and every later build then waits on it forever. Ours is an flock, which the OS
    # drops with its process: whoever holds it is the only builder, so a torch lock it finds is stale.
    with open(os.path.join(folder, "shuttle.lock"), "w") as held:
        try:
            import fcntl
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                os.remove(stale)
        except ImportError:   # not POSIX: torch's lock alone
            pass
        if not os.path.exists(os.path.join(folder, "shuttle_cpu_kernels.so")):
            print(f"[shuttle] building the CPU kernels into {folder} (once per machine, ~15-30 s)", file=sys.stderr, flush=True)
        # torch rebuilds when a source or a flag changes, not a header: the headers' hash rides in a flag
        digest = hashlib.sha1()
        for name in HEADERS:
            with open(os.path.join(CSRC, name), "rb") as f:
                digest.update(f.read())
        header = "-DSHUTTLE_KERNELS_H=" + digest.hexdigest()[:12]
        return load(name="shuttle_cpu_kernels", sources=SOURCES, extra_include_paths=[CSRC], extra_cflags=CFLAGS + [header], extra_ldflags=["-fopenmp"],
                    build_directory=folder, verbose=False)


def cpu_kernels():
    """The built extension (`.paged_decode`, `.kv_write`, `.panel_linear`, `.grouped_panel_linear`, `.moe_ffn`,
    `.rms_norm`, `.rotary`, `.row_max`, `.has_panel_linear()`, `.float_panel_cols()`, `.has_bf16_panels()`), or None where it is
    turned off or cannot be built (then the reason is printed once)."""
    with _lock:
        if "ext" in _built:
            return _built["ext"]
        ext = None
        if os.environ.get("SHUTTLE_CPU_KERNELS", "1") != "0":
            try:
                ext = _build()
            except Exception as e:   # no compiler, no headers, ...: the torch path still works
                print(f"[shuttle] the CPU kernels could not be built; attention and linear layers use torch ops "
                      f"(slower at large batches): {type(e).__name__}: {str(e).strip()[-500:]}", file=sys.stderr, flush=True)
        _built["ext"] = ext
        return ext


def for_tensor(x):
    """The kernels where they take x (a float32 or bfloat16 CPU tensor and the kernels built), else None.
    Cheap after the first call: the per-layer ops ask it on every call."""
    ext = _built["ext"] if "ext" in _built else cpu_kernels()
    if ext is None or x.dtype not in (_built.get("dtypes") or _float_dtypes()) or x.device.type != "cpu":
        return None
    return ext


def _float_dtypes() -> tuple:
    import torch
    _built["dtypes"] = (torch.float32, torch.bfloat16)
    return _built["dtypes"]
