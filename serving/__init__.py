"""The front door: the gRPC server, the engine thread, wire <-> engine mapping, the detokenizer and the
generated stubs (serving/v1). The HTTP API and metrics of later issues land here too."""
