"""Regenerate the committed gRPC stubs under `serving/v1/` from `proto/shuttle/v1/*.proto`.

    python -m serving.protogen          # rewrite the stubs after editing a .proto

The stubs are committed (so installing Shuttle needs no protoc) and never edited by hand;
`tests/unit/test_proto_stubs.py` regenerates them into a temporary directory and fails if their
content differs. The proto package stays `shuttle.v1` (the client contract), but the stubs live in
the Python package `serving.v1`: protoc is given the virtual include path
`-Iserving/v1=proto/shuttle/v1`, so it sees the file as `serving/v1/generation.proto` and writes
`from serving.v1 import generation_pb2` imports itself. Generating needs grpcio-tools of the same
version as grpcio (the `test` extra pins it).
"""

from __future__ import annotations

import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(REPO, "proto", "shuttle", "v1")
STUB_PACKAGE = os.path.join("serving", "v1")    # where the stubs go, relative to the output root
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[str]:
    """The .proto files under their virtual path (`serving/v1/<name>.proto`)."""
    return sorted(f"serving/v1/{os.path.basename(p)}" for p in glob.glob(os.path.join(PROTO_DIR, "*.proto")))


def generate(out_root: str) -> list[str]:
    """Run protoc (grpc_tools) into out_root; return the generated files, relative to out_root."""
    from grpc_tools import protoc
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(out_root, exist_ok=True)
    args = ["protoc", f"-Iserving/v1={PROTO_DIR}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *proto_files()]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(os.path.relpath(p, out_root) for p in glob.glob(os.path.join(out_root, STUB_PACKAGE, "*"))
                  if p.endswith(GENERATED_SUFFIXES))


def main() -> int:
    written = generate(REPO)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
