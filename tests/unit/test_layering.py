"""The house's import rules, read from every module's source (docs/architecture.md draws them).

A room may import rooms of a lower level and its own modules, never a room of its own level or
above; `scheduler/` and `serving/` import no torch; no two modules import each other, directly or
round a longer loop. Lazy imports inside functions count the same as module-level ones.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# level: a room may import rooms of strictly lower levels (and itself)
LEVELS = {
    "scheduler": 0,       # the head: torch-free plain data and policy
    "models": 0,          # checkpoint formats, weight layouts, CPU kernels
    "transfer": 1,        # the data plane between ranks
    "attention_node": 2,  # one rank kind each: they never import each other
    "expert_node": 2,
    "cluster": 3,         # Ray: placement, actors, the deployment
    "serving": 4,         # the front door (gRPC) and
    "tuner": 4,           # the deployment tuner never import each other
    "shuttle": 5,         # the CLI wires the house
    "train": 5,           # the demo model's training tool
}
TORCH_FREE = {"scheduler", "serving"}
TORCH_NAMES = {"torch", "torchvision", "torchaudio"}


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:           # relative: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from room import module` imports room.module
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return found


def import_graph(root: str) -> dict[str, list[tuple[str, int]]]:
    """module → imports, for every .py file of every room under root."""
    graph = {}
    for room in LEVELS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, room)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    module = module_name(root, path)
                    graph[module] = imports_of(path, module)
    return graph


def violations(root: str) -> list[str]:
    graph = import_graph(root)
    problems = []
    edges: dict[str, set[str]] = {m: set() for m in graph}
    for module, imports in graph.items():
        room = module.split(".")[0]
        for target, line in imports:
            top = target.split(".")[0]
            where = f"{module.replace('.', '/')}.py:{line} imports {target}"
            if top in TORCH_NAMES and room in TORCH_FREE:
                problems.append(f"{where}: {room}/ must not import torch")
            if top in LEVELS and top != room and LEVELS[top] >= LEVELS[room]:
                kind = "the same level" if LEVELS[top] == LEVELS[room] else "a higher level"
                problems.append(f"{where}: {top}/ is on {kind} than {room}/")
            if target in graph and target != module:
                edges[module].add(target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_house_keeps_its_import_rules():
    assert violations(REPO) == []


def test_every_room_is_known():
    """A new top-level package must be given a level here (and a line in docs/architecture.md)."""
    packages = {d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, "__init__.py"))}
    assert packages <= set(LEVELS), f"rooms without a level: {sorted(packages - set(LEVELS))}"


def _plant(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_a_planted_upward_import_fails(tmp_path):
    root = _plant(tmp_path, {
        "scheduler/__init__.py": "",
        "scheduler/engine.py": "def f():\n    from cluster.deployment import Deployment\n",
        "cluster/__init__.py": "",
        "cluster/deployment.py": "from scheduler.engine import f\n",
    })
    problems = violations(root)
    assert any("scheduler/engine.py:2 imports cluster.deployment" in p and "higher level" in p for p in problems)
    assert any("import cycle" in p for p in problems)


def test_torch_in_the_head_and_ranks_importing_each_other_fail(tmp_path):
    root = _plant(tmp_path, {
        "scheduler/__init__.py": "",
        "scheduler/kv.py": "import torch\n",
        "attention_node/__init__.py": "",
        "attention_node/rank.py": "from expert_node import experts\n",
        "expert_node/__init__.py": "",
        "expert_node/experts.py": "",
    })
    problems = violations(root)
    assert any("scheduler/kv.py:1 imports torch" in p for p in problems)
    assert any("attention_node/rank.py:1 imports expert_node" in p and "same level" in p for p in problems)


def test_two_modules_of_one_room_importing_each_other_fail(tmp_path):
    root = _plant(tmp_path, {
        "tuner/__init__.py": "",
        "tuner/local.py": "from tuner.profile import Profile\n",
        "tuner/profile.py": "def g():\n    from tuner import local\n",
    })
    assert violations(root) == ["import cycle: tuner.local -> tuner.profile -> tuner.local"]
