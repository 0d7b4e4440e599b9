"""`shuttle serve` under signals, as a supervisor or a user sends them (docs/serving.md, "Signals").

- SIGTERM or Ctrl-C while the model loads abandons the load and exits 0 within seconds, not after
  the load; nothing the load started (the private Ray, rank processes) survives.
- SIGKILL once serving leaves no process behind either: the private Ray dies with the server
  (cluster/ray_env.py: the reaper).

Every process the server starts is tracked while it runs: psutil, the server's descendants only,
never any other process on the machine. After the server is gone they must all be gone too.
"""

import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

EXIT_BOUND_S = 30.0      # the load of the tiny model takes longer than the abort on this machine
GONE_BOUND_S = 30.0      # Ray's agents alone took ~60 s to go before the reaper


class Descendants:
    """Every process descended from `pid`, seen by polling while it runs: pid → (create time, name)."""

    def __init__(self, pid: int, period_s: float = 0.2):
        self.root = psutil.Process(pid)
        self.seen: dict[int, tuple[float, str]] = {}
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(period_s,), daemon=True)
        self._thread.start()

    def _poll(self, period_s: float) -> None:
        while not self._quit.is_set():
            self.snapshot()
            self._quit.wait(period_s)

    def snapshot(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:      # the name again each time: Ray's processes set their titles after they start
                created = p.create_time()
                if self.seen.get(p.pid, (created,))[0] == created:
                    self.seen[p.pid] = (created, p.name())
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._quit.set()
        self._thread.join()

    def names(self) -> set[str]:
        return {name for _, name in self.seen.values()}

    def alive(self) -> list[str]:
        left = []
        for pid, (created, name) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{name} ({pid})")
            except psutil.Error:
                pass
        return left

    def wait_gone(self, timeout_s: float) -> tuple[list[str], float]:
        """(what is still alive at the deadline, seconds waited)."""
        t0 = time.monotonic()
        while (left := self.alive()) and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)
        return left, time.monotonic() - t0


class Serve:
    """`shuttle serve` as a subprocess; its stderr read line by line on a thread."""

    def __init__(self, model_dir: str, *flags: str):
        cmd = [sys.executable, "-m", "shuttle.cli", "serve", "--model", model_dir, "--port", "0",
               "--attention-ranks", "1", "--expert-ranks", "1", *flags]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.tree = Descendants(self.proc.pid)
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append("")         # EOF
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if line == "":
                        raise AssertionError(f"shuttle serve exited before {pattern!r}:\n{self.log()}")
                    if re.search(pattern, line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} within {timeout_s:g}s:\n{self.log()}")
                self._new.wait(left)

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.tree.stop()
        for pid in self.tree.seen:        # never leave a process of ours behind, even when a test failed
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


@pytest.fixture
def serve(tiny_model):
    started = []

    def start(*flags):
        s = Serve(tiny_model("mixtral"), *flags)
        started.append(s)
        return s
    yield start
    for s in started:
        s.close()


def _wait_for_process(s: "Serve", name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while name not in s.tree.names():
        assert time.monotonic() < deadline and s.proc.poll() is None, f"no {name} process:\n{s.log()}"
        time.sleep(0.05)
        s.tree.snapshot()


@pytest.mark.parametrize("sig, trigger", [
    (signal.SIGINT, r"starting a private Ray"),   # in ray.init: its GCS is up, the raylet starting
    (signal.SIGTERM, r"loading weights"),          # Ray up, rank actors being created and loading
], ids=["sigint-starting-ray", "sigterm-loading-weights"])
def test_signal_while_loading_abandons_the_load_and_exits_0(serve, sig, trigger):
    s = serve()
    s.wait_for(trigger)
    if sig == signal.SIGINT:
        _wait_for_process(s, "gcs_server")
    s.tree.snapshot()
    s.proc.send_signal(sig)
    t0 = time.monotonic()
    try:
        code = s.proc.wait(EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"shuttle serve still running {EXIT_BOUND_S:g}s after {sig.name} while loading:\n{s.log()}")
    exited = time.monotonic() - t0
    s.tree.stop()
    left, waited = s.tree.wait_gone(GONE_BOUND_S)
    s.wait_for("load abandoned", 10)
    print(f"{sig.name} after {trigger!r}: exit {code} after {exited:.2f}s; its {len(s.tree.seen)} processes "
          f"({', '.join(sorted(s.tree.names()))}) gone {waited:.2f}s later")
    assert code == 0, s.log()
    assert not any("serving " in line for line in s.lines), "the load finished before the signal: nothing was aborted"
    assert not left, f"still alive {GONE_BOUND_S:g}s after shuttle serve exited: {left}"
    assert "gcs_server" in s.tree.names(), s.tree.names()


def test_sigkill_once_serving_leaves_no_process_behind(serve):
    s = serve()
    s.wait_for(r"health SERVING")
    s.tree.snapshot()
    names = s.tree.names()
    # what used to outlive a killed server: Ray's agents (about a minute), besides the ranks and daemons
    for expected in ("raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
                     "ray::AttentionRankActor", "ray::ExpertRankActor"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    s.proc.kill()
    s.proc.wait(30)
    s.tree.stop()
    left, waited = s.tree.wait_gone(GONE_BOUND_S)
    print(f"SIGKILL once serving: its {len(s.tree.seen)} processes gone {waited:.2f}s later")
    assert not left, f"still alive {GONE_BOUND_S:g}s after SIGKILL: {left}"
