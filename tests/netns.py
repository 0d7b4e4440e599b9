"""Hosts on one machine for cluster tests: network namespaces joined by a veth pair, and process
trees in their own PID namespace so `ray stop` (which kills every Ray process it can see) and
teardown touch only what the test started. Root only; `unavailable()` says why not.

    with VethPair("shuttle-a", "10.213.0.1", "shuttle-b", "10.213.0.2") as hosts:
        head = IsolatedTree(["ray", "start", "--head", ..., "--block"], netns=hosts.a.netns)
        head.run(["shuttle", "run", ...])     # runs inside the tree's net, PID and mount namespaces
        head.kill()                           # the tree's init dies; the kernel kills the rest
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass


def sh(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def unavailable(*tools: str) -> str | None:
    """Why namespaced hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and PID namespaces)"
    for tool in ("ip", "unshare", "nsenter", *tools):
        if not shutil.which(tool):
            return f"needs the `{tool}` command"
    name = "shuttle-probe-" + uuid.uuid4().hex[:6]
    try:
        sh(["ip", "netns", "add", name], timeout=10)
        try:
            sh(["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"], timeout=10)
        finally:
            sh(["ip", "netns", "del", name], timeout=10)
        sh(["unshare", "--pid", "--fork", "--mount-proc", "true"], timeout=10)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"cannot create network/PID namespaces here: {e}"
    return None


@dataclass
class Host:
    netns: str
    ifname: str
    address: str

    def read_counter(self, name: str) -> int:
        return int(sh(["ip", "netns", "exec", self.netns, "cat", f"/sys/class/net/{self.ifname}/statistics/{name}"]).stdout)


class VethPair:
    """Two network namespaces joined by a veth pair, addresses on a /24 of our own."""

    def __init__(self, prefix: str, address_a: str, address_b: str):
        tag = uuid.uuid4().hex[:5]
        self.a = Host(f"{prefix}-a-{tag}", f"sha{tag}", address_a)
        self.b = Host(f"{prefix}-b-{tag}", f"shb{tag}", address_b)

    def __enter__(self) -> "VethPair":
        try:
            for h in (self.a, self.b):
                sh(["ip", "netns", "add", h.netns])
            sh(["ip", "link", "add", self.a.ifname, "type", "veth", "peer", "name", self.b.ifname])
            for h in (self.a, self.b):
                sh(["ip", "link", "set", h.ifname, "netns", h.netns])
                sh(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.ifname])
                sh(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                sh(["ip", "-n", h.netns, "link", "set", h.ifname, "up"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in (self.a, self.b):       # deleting a namespace deletes its end of the veth, and the pair
            sh(["ip", "netns", "del", h.netns], check=False)


class IsolatedTree:
    """A process tree in its own PID and mount namespace (a private /proc), optionally inside a
    named network namespace (or a new anonymous one with `new_netns`). The init is `argv`; when it
    dies every process of the tree dies. `run()` starts more processes inside."""

    def __init__(self, argv: list[str], log_path: str, netns: str | None = None, new_netns: bool = False,
                 env: dict | None = None):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] + (["--net"] if new_netns else [])
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(prefix + unshare + argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self.init_pid = self._find_init(10.0)

    def _find_init(self, timeout_s: float) -> int:
        """Host PID of the tree's init: the first descendant of our child in another PID namespace."""
        ours = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queue = [self.proc.pid]
            while queue:
                pid = queue.pop(0)
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") != ours:
                        return pid
                    with open(f"/proc/{pid}/task/{pid}/children") as f:
                        queue += [int(c) for c in f.read().split()]
                except (FileNotFoundError, ProcessLookupError):
                    continue
            if self.proc.poll() is not None:
                raise RuntimeError(f"namespace init exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"namespace init did not start within {timeout_s:g}s")

    def prefix(self) -> list[str]:
        return ["nsenter", "--target", str(self.init_pid), "--pid", "--net", "--mount", "--"]

    def run(self, argv: list[str], timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(self.prefix() + argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
        return p

    def popen(self, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.prefix() + argv, env=env, stdin=subprocess.DEVNULL, **kw)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-6000:]

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode} before saying {text!r}:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"did not say {text!r} within {timeout_s:g}s:\n{self.log()}")

    def processes(self) -> list[str]:
        """Command lines of the processes in this tree's PID namespace (but its init)."""
        try:
            mine = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except FileNotFoundError:
            return []
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) != self.init_pid and os.readlink(f"/proc/{pid}/ns/pid") == mine:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        return [c for c in out if c]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()          # --kill-child: the init gets SIGKILL, and with it the whole PID namespace
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()
