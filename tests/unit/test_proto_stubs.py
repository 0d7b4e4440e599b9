"""The committed stubs in serving/v1 are exactly what protoc makes from proto/ (never hand-edited)."""

import os

from serving import protogen


def test_committed_stubs_match_regenerated(tmp_path):
    generated = protogen.generate(str(tmp_path))
    assert generated, "protoc generated nothing"
    committed = sorted(os.path.relpath(os.path.join(d, f), protogen.REPO)
                       for d, _, files in os.walk(os.path.join(protogen.REPO, protogen.STUB_PACKAGE))
                       for f in files if f.endswith(protogen.GENERATED_SUFFIXES))
    assert committed == generated, "stale or missing stubs: run `python -m serving.protogen`"
    for rel in generated:
        with open(tmp_path / rel) as fresh, open(os.path.join(protogen.REPO, rel)) as kept:
            assert kept.read() == fresh.read(), f"{rel} differs from protoc's output: run `python -m serving.protogen`"


def test_proto_is_not_an_importable_package():
    # `proto` is proto-plus's import name (ray[default] installs it): never shadow it.
    assert not os.path.exists(os.path.join(protogen.REPO, "proto", "__init__.py"))
    assert not os.path.exists(os.path.join(protogen.REPO, "proto", "shuttle", "__init__.py"))


def test_stubs_import_and_describe_the_service():
    from serving.v1 import generation_pb2, generation_pb2_grpc
    assert generation_pb2.DESCRIPTOR.package == "shuttle.v1"   # the client contract keeps its name
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "shuttle.v1.Generation"
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "GetModelInfo", "GetServerStatus"}
    assert hasattr(generation_pb2_grpc, "GenerationStub")
