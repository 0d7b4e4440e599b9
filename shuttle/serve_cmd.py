"""`shuttle serve` (the gRPC server) and `shuttle generate` (a streaming client for the terminal).

    shuttle serve [--model DIR] [--host H] [--port P] [deployment flags as `shuttle run`]
                  [--tls-cert PEM --tls-key PEM] [--auth-token T | $SHUTTLE_AUTH_TOKEN]
    shuttle generate "prompt" | --prompt-ids 1,2,3  [--address H:P] [--max-tokens N]
                  [--temperature T] [--stop S ...] [--json]

With no --model, `serve` uses the embedded demo model (the trained `models/shipped/shuttle-moe-tiny`).
The port is bound first, with health NOT_SERVING while the weights load; SIGTERM or Ctrl-C drains
(health NOT_SERVING, new calls refused, in-flight requests finish within --drain-grace-s, the rest
are cancelled) and exits 0. While loading, SIGTERM or Ctrl-C abandons the load and exits 0 at once:
the loading thread is blocked in Ray calls and cannot be interrupted, so the process ends with
`os._exit`, and what the load started goes with it: the private Ray's processes through its reaper
(cluster/ray_env.py: the same mechanism that cleans up after a SIGKILL), a joined cluster's actors
and placement groups through Ray's own clean-up of a dead driver's job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

DEFAULT_PORT = 50051


def add_parser(sub) -> argparse.ArgumentParser:
    from shuttle.cli import add_engine_flags
    p = sub.add_parser("serve", help="serve the model over gRPC (shuttle.v1.Generation)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind (0: any free port, printed at start)")
    p.add_argument("--plan", default=None, help="a deployment plan file (flags override its values)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: a private local Ray)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (needs --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--auth-token", default=os.environ.get("SHUTTLE_AUTH_TOKEN"),
                   help="require 'authorization: Bearer <token>' on every call but health (default: $SHUTTLE_AUTH_TOKEN)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger GenerateRequests get INVALID_ARGUMENT")
    p.add_argument("--drain-grace-s", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests may take to finish")
    add_engine_flags(p)
    p.set_defaults(func=serve)

    g = sub.add_parser("generate", help="stream a completion from a running server to the terminal")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text (needs a model with a tokenizer)")
    g.add_argument("--prompt-ids", default=None, help='the prompt as comma-separated token ids: "1,2,3"')
    g.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}", help="server host:port")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default: 16)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--json", action="store_true", help="one JSON object per streamed chunk instead of text")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--token", default=os.environ.get("SHUTTLE_AUTH_TOKEN"), help="bearer token (default: $SHUTTLE_AUTH_TOKEN)")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", default=None, help="PEM file of the CA (or self-signed certificate) to trust; implies TLS")
    g.set_defaults(func=generate)
    return p


# ---- shuttle serve ---------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    from serving.server import ServerOptions
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    options = ServerOptions(host=args.host, port=args.port, max_request_bytes=args.max_request_bytes,
                            auth_token=args.auth_token or None, drain_grace_s=args.drain_grace_s,
                            tls_cert=_read(args.tls_cert), tls_key=_read(args.tls_key))
    _exit_on_signal(0)      # until the event loop takes the signals over: nothing has started yet
    code = 1
    try:
        code = asyncio.run(_serve(args, options))
        return code
    finally:
        _exit_on_signal(code)   # the loop is gone (its handlers with it); everything is stopped


def _exit_on_signal(code: int) -> None:
    """SIGTERM / SIGINT end the process at once with `code` (outside the event loop's lifetime)."""
    def handler(signum, frame):
        _exit(code, f"{signal.Signals(signum).name} received: exiting")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _exit(code: int, msg: str) -> None:
    """Say `msg`, flush, and end the process now: no interpreter shutdown (no thread joins, no atexit)."""
    _say(msg)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _say(msg: str) -> None:
    print(f"[shuttle] {msg}", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace, options) -> int:
    from serving.server import Server
    from shuttle.cli import engine_config
    from shuttle.plan_file import load_plan_values

    config = engine_config(args, load_plan_values(args.plan) if args.plan else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handle_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    handle_signals()
    server = Server(options)
    port = await server.start()
    scheme = "tls" if options.tls_cert else "plaintext"
    _say(f"listening on {options.host}:{port} ({scheme}{', bearer token required' if options.auth_token else ''}); health NOT_SERVING until the model is loaded")
    t0 = time.monotonic()
    load = loop.run_in_executor(None, _resolve_and_load, args.model, config, args.address)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        # A signal while loading: abandon the load (see the module docstring). Health is already
        # NOT_SERVING and generation calls refused; stop answering, then end the process.
        try:
            await asyncio.wait_for(server.drain(grace_s=0), 3.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        _exit(0, f"stop requested while loading: load abandoned after {time.monotonic() - t0:.1f}s; "
                 "stopping what it started")
    stopped.cancel()
    try:
        engine, model = load.result()
    except BaseException:
        await server.drain(grace_s=0)   # no engine yet: just stops the server
        raise
    handle_signals()  # again: Ray's core worker installs its own SIGTERM handler (it logs a stack trace, then chains)
    await server.attach(engine, model)
    _say(f"serving {model.name} ({model.family}, {config.attention_ranks} attention + {config.expert_ranks} expert ranks, "
         f"{config.micro_batches} micro-batches) after {time.monotonic() - t0:.1f}s; health SERVING")
    example = '"Hello"' if model.tokenizer else "--prompt-ids 1,2,3"
    _say(f"try: shuttle generate --address {options.host}:{port} {example}")
    if stop.is_set():
        _say("stop requested while loading")
    failed = asyncio.ensure_future(server.failed.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
    if server.failed.is_set():
        _say(f"engine failed: {server.engine_error}; shutting down")
        await server.drain(grace_s=0)
        return 1
    _say(f"draining: up to {options.drain_grace_s:g}s for {server.calls_in_flight} in-flight requests")
    await server.drain()
    _say("stopped")
    return 0


def _resolve_and_load(model: str | None, config, address: str | None):
    """Find the model (the embedded one may be generated), then `_load` it (blocking: a worker thread)."""
    from shuttle.run_cmd import resolve_model
    model_dir = resolve_model(model)
    _say(f"loading {model_dir}: " + (f"joining the Ray cluster at {address}" if address else "starting a private Ray"))
    return _load(model_dir, config, address)


def _load(model_dir: str, config, address: str | None):
    """Build the deployment and describe it for clients (blocking: runs on a worker thread)."""
    from cluster.deployment import build_engine
    from serving.server import ServedModel
    engine = build_engine(model_dir, config, address=address, progress=_say)
    spec, placement = engine.ranks.spec, engine.ranks.placement
    tokenizer = None
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    else:
        _say(f"{model_dir} has no tokenizer.json: serving token ids only")
    model = ServedModel(name=os.path.basename(os.path.normpath(model_dir)), family=spec.family,
                        vocab_size=spec.vocab_size, max_model_len=engine.limits.max_model_len,
                        eos_token_ids=tuple(engine.limits.eos_token_ids), num_layers=spec.num_layers,
                        num_experts=spec.num_experts, experts_per_token=spec.top_k, hidden_size=spec.hidden_size,
                        dtype=config.dtype, expert_owner=tuple(placement.owner), tokenizer=tokenizer)
    return engine, model


# ---- shuttle generate ------------------------------------------------------------------------
def generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict
    from shuttle.client import ShuttleClient
    from shuttle.run_cmd import parse_prompt_ids

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError('give a prompt ("text") or --prompt-ids, not both')
    token_ids = parse_prompt_ids([args.prompt_ids])[0] if args.prompt_ids is not None else None
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos or None, logprobs=args.logprobs or None)
    client = ShuttleClient(args.address, token=args.token, tls=args.tls, tls_ca=_read(args.tls_ca), timeout_s=args.timeout)
    try:
        has_text = args.json or client.model_info().has_tokenizer
        last = None
        for chunk in client.stream(args.prompt, token_ids=token_ids, **sampling):
            last = chunk
            if args.json:
                print(json.dumps(MessageToDict(chunk, preserving_proto_field_name=True)), flush=True)
            elif has_text:
                print(chunk.text, end="", flush=True)
            elif chunk.token_ids:
                print(" ".join(map(str, chunk.token_ids)), end=" ", flush=True)
    except grpc.RpcError as e:
        raise RuntimeError(f"{e.code().name}: {e.details()}") from None
    finally:
        client.close()
    if not args.json and last is not None:
        from serving.v1 import generation_pb2 as pb
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        t = last.timing
        print(f"\n[{reason}: {last.usage.completion_tokens} tokens, first token {t.time_to_first_token_s * 1000:.0f} ms, "
              f"{t.time_per_output_token_s * 1000:.1f} ms/token]", file=sys.stderr, flush=True)
    return 0
