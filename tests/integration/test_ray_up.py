"""A real `ray up cluster/local.yaml` against this machine over ssh to 127.0.0.1: the YAML as
shipped (placeholders filled in), its setup commands (./dev, the login-shell environment), Ray's
head started by the YAML's own commands, `shuttle serve --address auto` on the head through
`ray exec`, a gRPC generation equal to Hugging Face's, SIGTERM drain, then `ray down` — after
which no Ray process is left.

Isolation: sshd, and so everything `ray up` starts over ssh, runs in its own network, PID and mount
namespaces with a private /tmp/ray. `ray stop` (run by the YAML and by `ray down`) kills every Ray
process it can see; here it sees only this test's. Root only; openssh-server and rsync are
installed with apt-get when missing. Skipped, with the reason, where that cannot be done.
"""

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import netns
from tiny_models import hf_generate

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
SSHD = "/usr/sbin/sshd"


def install_ssh() -> str | None:
    """openssh-server and rsync, installed if missing; the reason if that is impossible."""
    if os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("rsync") and shutil.which("ssh-keygen"):
        return None
    if not shutil.which("apt-get"):
        return "needs openssh-server and rsync, and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv, timeout in ((["apt-get", "update", "-q"], 240),
                          (["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server",
                            "openssh-client", "rsync"], 300)):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(argv)}` did not finish within {timeout}s"
        if p.returncode != 0:
            return f"`{' '.join(argv)}` failed: {p.stderr.strip()[-500:]}"
    return None


def cluster_yaml(path: str, name: str, key: str) -> None:
    """cluster/local.yaml with its placeholders filled in for this machine, as a user would."""
    with open(os.path.join(REPO, "cluster", "local.yaml")) as f:
        text = f.read()
    fills = {"cluster_name: shuttle\n": f"cluster_name: {name}\n", "HEAD_IP": "127.0.0.1",
             "[WORKER_IP_1]": "[]", "SSH_USER": "root", "SSH_KEY": key, "SHUTTLE_DIR": REPO}
    for placeholder, value in fills.items():
        assert placeholder in text, f"cluster/local.yaml lost its {placeholder!r} placeholder"
        text = text.replace(placeholder, value)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def ssh_host():
    """sshd on 127.0.0.1:22 of a fresh network namespace, root logs in with a throwaway key."""
    reason = netns.unavailable() or install_ssh()
    if reason:
        pytest.skip(f"ray up test: {reason}")
    if not os.path.samefile(BIN, os.path.join(REPO, ".venv", "bin")):
        pytest.skip(f"ray up test: run from the ./dev venv ({REPO}/.venv), not {BIN}")
    # The YAML's setup runs ./dev inside the namespace, which has no network: make the install current
    # here first (a no-op right after `./dev test`), so that it is a no-op there too.
    dev = subprocess.run([os.path.join(REPO, "dev"), "shuttle", "--help"], capture_output=True, text=True,
                         timeout=900, stdin=subprocess.DEVNULL, cwd=REPO)
    assert dev.returncode == 0, f"./dev shuttle --help failed:\n{dev.stderr[-3000:]}"
    work = tempfile.mkdtemp(prefix="shuttle-rayup-")
    home = os.path.join(work, "home")
    os.makedirs(os.path.join(work, "ray"))
    os.makedirs(home)
    for key in ("key", "hostkey"):
        netns.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(work, key)])
    shutil.copy(os.path.join(work, "key.pub"), os.path.join(work, "authorized_keys"))
    with open(os.path.join(work, "sshd_config"), "w") as f:
        f.write(f"""Port 22
ListenAddress 127.0.0.1
HostKey {work}/hostkey
PidFile {work}/sshd.pid
AuthorizedKeysFile {work}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
PrintMotd no
SetEnv HOME={home}
Subsystem sftp internal-sftp
""")
    os.makedirs("/run/sshd", exist_ok=True)          # sshd's privilege-separation directory
    os.makedirs("/tmp/ray", exist_ok=True)           # a mount point: the namespace gets its own /tmp/ray
    init = (f"ip link set lo up && mount --bind {work}/ray /tmp/ray && "
            f"exec {SSHD} -D -e -f {work}/sshd_config")
    tree = netns.IsolatedTree(["sh", "-c", init], os.path.join(work, "sshd.log"), new_netns=True)
    os.makedirs(os.path.join(work, "tmp"))           # ray up's config cache and ssh control sockets
    env = {**os.environ, "HOME": home, "TMPDIR": os.path.join(work, "tmp"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    try:
        ssh = ["ssh", "-i", f"{work}/key", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "root@127.0.0.1"]
        deadline = time.monotonic() + 30
        while tree.run(ssh + ["true"], timeout=20, env=env, check=False).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"sshd in the namespace did not accept the key within 30s:\n{tree.log()}")
            time.sleep(0.5)
        yield tree, work, env
    finally:
        tree.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_ray_up_serve_ray_down(ssh_host, tiny_model):
    tree, work, env = ssh_host
    model = tiny_model("mixtral")
    config = os.path.join(work, "cluster.yaml")
    name = f"shuttle-test-{uuid.uuid4().hex[:6]}"
    cluster_yaml(config, name, f"{work}/key")
    try:
        up_serve_down(tree, work, env, config, model)
    finally:   # Ray's ssh runner keeps its control sockets in /tmp/ray_ssh_<user hash>/<cluster hash>
        user_dir = f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
        shutil.rmtree(os.path.join(user_dir, hashlib.sha256(name.encode()).hexdigest()[:10]), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(user_dir)            # only if no other cluster's sockets are there


def up_serve_down(tree, work, env, config, model):

    up = tree.run([f"{BIN}/ray", "up", "-y", "--no-config-cache", config], timeout=300, env=env)
    assert "Ray runtime started" in up.stdout + up.stderr

    serve_log = open(os.path.join(work, "serve.log"), "w+")
    serve = tree.popen([f"{BIN}/ray", "exec", config,
                        f"sh -c 'echo $$ > ~/serve.pid; exec shuttle serve --address auto --port 50051 "
                        f"--model {model} --attention-ranks 1 --expert-ranks 2'"],
                       env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "health SERVING" not in open(serve_log.name).read():
            assert serve.poll() is None, f"shuttle serve exited {serve.returncode}:\n{open(serve_log.name).read()[-6000:]}"
            assert time.monotonic() < deadline, f"shuttle serve not SERVING within 180s:\n{open(serve_log.name).read()[-6000:]}"
            time.sleep(0.5)
        log = open(serve_log.name).read()
        assert "joined the Ray cluster at auto" in log and "placement by cpu-slots" in log, log[-4000:]

        gen = tree.run([f"{BIN}/ray", "exec", config,
                        "shuttle generate --address 127.0.0.1:50051 --prompt-ids 1,2,3 --max-tokens 8 --json"],
                       timeout=120, env=env)
        chunks = [json.loads(line) for line in gen.stdout.splitlines() if line.startswith("{")]
        tokens = [t for c in chunks for t in c.get("token_ids", [])]
        ref_tokens, _ = hf_generate(model, [[1, 2, 3]], 8)
        assert tokens == ref_tokens[0], f"served {tokens}, transformers {ref_tokens[0]}"
        assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"

        tree.run([f"{BIN}/ray", "exec", config, "kill -TERM $(cat ~/serve.pid)"], timeout=60, env=env)
        assert serve.wait(timeout=90) == 0, open(serve_log.name).read()[-4000:]
        assert "stopped" in open(serve_log.name).read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=30)

    tree.run([f"{BIN}/ray", "down", "-y", config], timeout=180, env=env)
    deadline = time.monotonic() + 30
    while (left := [c for c in tree.processes() if "ray" in c.lower() and "sshd" not in c]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"ray down left Ray processes: {left}"
