"""Generated gRPC stubs of `proto/shuttle/v1/` (proto package `shuttle.v1`).

Never edit the `*_pb2*` files: change the .proto and run `python -m serving.protogen`.
"""
