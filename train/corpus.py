"""The training text: English that ships with every CPython, read from the running interpreter.

Sources, under the standard library directory `sysconfig.get_paths()["stdlib"]` (LIB below):

| source | what is taken |
|---|---|
| `LIB/**/*.py` | every module, class and function docstring (`ast.get_docstring`, cleaned) |
| `LIB/pydoc_data/topics.py` | the `topics` dict: the language reference as plain text (what `help("if")` prints) |
| `LIB/**/*.txt`, `LIB/**/*.rst` | as is |

Excluded everywhere: `site-packages/`, test directories (`test/`, `tests/`, `idle_test/`) and the
grammar files of lib2to3 (`*Grammar*.txt`, not prose). `/usr/share/doc` is not used: what it holds
depends on the packages installed, the standard library depends only on the Python version.

A *document* is one file's text (its docstrings joined by blank lines) or one pydoc topic. Held-out
documents are chosen by a hash of their name (`sha256(name) % heldout_every == 0`), so the split
does not depend on the order of the walk, the machine or the training settings. The corpus digest
is the sha256 of every document's name and text, in order: two machines with the same digest
train on the same bytes.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field

EXCLUDED_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__")
TOPICS_FILE = os.path.join("pydoc_data", "topics.py")


@dataclass
class Document:
    name: str          # "path/relative/to/LIB" or "pydoc_data/topics.py:<topic>"
    text: str


@dataclass
class Corpus:
    root: str
    train: list[Document] = field(default_factory=list)
    heldout: list[Document] = field(default_factory=list)

    def stats(self) -> dict:
        def size(docs):
            return sum(len(d.text.encode()) for d in docs)
        digest = hashlib.sha256()
        for d in self.train + self.heldout:
            digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
        kinds = {}
        for d in self.train + self.heldout:
            kind = ("pydoc topics" if d.name.startswith(TOPICS_FILE + ":")
                    else "docstrings (*.py)" if d.name.endswith(".py") else "text (*.txt, *.rst)")
            n, b = kinds.get(kind, (0, 0))
            kinds[kind] = (n + 1, b + len(d.text.encode()))
        return {"root": self.root, "documents": len(self.train) + len(self.heldout),
                "train_documents": len(self.train), "heldout_documents": len(self.heldout),
                "train_bytes": size(self.train), "heldout_bytes": size(self.heldout),
                "sha256": digest.hexdigest(), "by_source": {k: {"documents": n, "bytes": b} for k, (n, b) in sorted(kinds.items())}}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _excluded(rel: str) -> bool:
    parts = rel.split(os.sep)
    return any(p in EXCLUDED_DIRS for p in parts[:-1]) or "Grammar" in parts[-1]


def source_files(root: str) -> list[str]:
    """Paths relative to root, sorted, after the exclusions above."""
    found = []
    for pattern in ("**/*.py", "**/*.txt", "**/*.rst"):
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            rel = os.path.relpath(path, root)
            if os.path.isfile(path) and not _excluded(rel):
                found.append(rel)
    return sorted(set(found))


def docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are Python 2 examples or templates
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, nodes) for d in [ast.get_docstring(node)] if d]


def documents(root: str, max_files: int | None = None) -> list[Document]:
    """Every document of the corpus, in a fixed order (sorted file names; topics in dict order)."""
    docs = []
    for rel in source_files(root)[:max_files]:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if rel == TOPICS_FILE:
            namespace: dict = {}
            exec(compile(text, rel, "exec"), namespace)   # a module of one dict literal
            docs += [Document(f"{rel}:{k}", v.strip()) for k, v in namespace["topics"].items() if v.strip()]
        elif rel.endswith(".py"):
            body = "\n\n".join(docstrings(text))
            if body:
                docs.append(Document(rel, body))
        elif text.strip():
            docs.append(Document(rel, text.strip()))
    return docs


def is_heldout(name: str, heldout_every: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % heldout_every == 0


def load_corpus(root: str | None = None, heldout_every: int = 20, max_files: int | None = None) -> Corpus:
    root = root or stdlib_dir()
    corpus = Corpus(root)
    for d in documents(root, max_files):
        (corpus.heldout if is_heldout(d.name, heldout_every) else corpus.train).append(d)
    if not corpus.train or not corpus.heldout:
        raise ValueError(f"corpus under {root}: {len(corpus.train)} training and {len(corpus.heldout)} held-out "
                         f"documents; both must be non-empty (more files, or a smaller --heldout-every)")
    return corpus
