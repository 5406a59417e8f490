"""`nano-vllm serve [MODEL]`: the OpenAI-compatible server under uvicorn.

    nano-vllm serve                                   # the embedded SmolLM2 on http://127.0.0.1:8000
    nano-vllm serve ./my-model --port 9000 --api-key secret --max-num-seqs 32

It binds 127.0.0.1 unless told otherwise (`--host 0.0.0.0` opens it to the
network; give it an `--api-key` then). The key may also come from the
NANO_VLLM_API_KEY environment variable, which keeps it out of `ps`.

The model runs in an engine core process of its own (engine/core.py); this
process does HTTP. A core that cannot start (a bad model file, no GPU) is
reported in one line and the command exits 2; a core that dies while serving
ends every open request with an error and the server exits 1.

SIGTERM (or Ctrl-C) shuts down gracefully: the listening socket closes, new
requests are refused, requests in flight get `--shutdown-timeout` seconds to
finish and are then ended with an error (a 503, or an error event in a
stream), the core stops, and the process exits 0. A second Ctrl-C quits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import socket
from pathlib import Path
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Awaitable, Callable

import uvicorn

from nanovllm.engine.core import CoreAddresses, CoreInfo

if TYPE_CHECKING:
    from fastapi import FastAPI

    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.server.app import ServerConfig, default_served_model_name
    from nanovllm.server.security import SecurityConfig

API_KEY_ENV = "NANO_VLLM_API_KEY"
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanovllm.engine_args import add_engine_args
    from nanovllm.server.app import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING
    from nanovllm.server.security import add_security_arguments

    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, .gguf or llama2.c .bin (default: the embedded SmolLM2-135M-Instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", default=None,
                        help="the name clients put in `model` (default: the model's directory or file stem)")
    server.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every route but /health (or set {API_KEY_ENV})")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 before they are parsed")
    server.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="queued sequences beyond which new requests get 503")
    server.add_argument("--log-interval", type=float, default=5.0,
                        help="seconds between throughput log lines while busy")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds requests in flight may take to finish before they are aborted")
    add_security_arguments(server)
    server.add_argument("--api-server-count", type=int, default=1,
                        help="HTTP processes sharing the port (tokenizing, detokenized JSON, SSE) over one engine core")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    server.add_argument("--access-log", action="store_true", help="log every HTTP request")
    server.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template to use instead of the model's")
    server.add_argument("--reasoning-parser", default=None, choices=["qwen3"],
                        help="move <think> text to reasoning_content in chat replies")
    server.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "llama3_json"],
                        help='how tool_choice "auto" reads tool calls from the reply (default: hermes)')
    add_engine_args(parser)


def _read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--chat-template {path}: cannot read it ({error.strerror})") from None


def main(args: argparse.Namespace) -> int:
    from nanovllm.engine.async_engine import AsyncLLMEngine, EngineStartupError
    from nanovllm.engine_args import engine_config_from_args
    from nanovllm.server.app import ServerConfig
    from nanovllm.server.security import security_config_from_args

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {args.api_server_count}")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    server_config = ServerConfig(served_model_name=args.served_model_name, api_key=api_key,
                                 max_request_bytes=args.max_request_bytes, max_waiting=args.max_waiting,
                                 log_interval=args.log_interval, security=security_config_from_args(args),
                                 chat_template=_read_chat_template(args.chat_template),
                                 reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser)
    log = logging.getLogger("nanovllm.server")
    if not _is_loopback(args.host) and api_key is None:
        log.warning("binding %s without an API key: anyone who can reach this port can use the model; "
                    "pass --api-key or set %s", args.host, API_KEY_ENV)
    try:
        async_engine = AsyncLLMEngine.launch(engine_config_from_args(args, model=args.model), args.max_waiting,
                                             num_clients=args.api_server_count)
    except EngineStartupError as error:
        raise ValueError(f"the engine could not start: {error}") from None
    try:
        return _serve_all(async_engine, args, server_config)
    finally:   # however serving ended, no process of ours outlives this one
        async_engine.kill_processes()


def _serve_all(async_engine: AsyncLLMEngine, args: argparse.Namespace, server_config: ServerConfig) -> int:
    """Start the extra API processes, wait until each takes connections, then serve in this one."""
    from nanovllm.server.app import default_served_model_name

    listen = _listening_socket(args.host, args.port, shared=args.api_server_count > 1)
    logging.getLogger("nanovllm.server").info(
        "serving %s as %r (max_model_len %d) on http://%s:%d/v1 with %d API process(es)",
        async_engine.info.model or "the embedded model",
        server_config.served_model_name or default_served_model_name(async_engine.info.model,
                                                                     async_engine.info.load_format),
        async_engine.info.max_model_len, args.host, args.port, args.api_server_count)
    options = ServeOptions(args.host, args.port, args.log_level, args.access_log, args.shutdown_timeout)
    app = _build_app(async_engine, server_config)   # before the others start: this one serves at once then
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(1, args.api_server_count)]
    async_engine.peers = [context.Process(target=run_api_server, name=f"nanovllm-api-{index}",
                                          args=(async_engine.info, async_engine.addresses, index, server_config,
                                                options, ready[index - 1]))
                          for index in range(1, args.api_server_count)]
    for peer in async_engine.peers:
        peer.start()
    for peer, started in zip(async_engine.peers, ready):   # serve only once every process takes connections
        while not started.wait(timeout=1.0):
            if not peer.is_alive():
                raise ValueError(f"API process {peer.name} exited with code {peer.exitcode} while starting; "
                                 "its log above says why")
    return serve(async_engine, app, options, listen, server_config.security)


@dataclass
class ServeOptions:
    host: str
    port: int
    log_level: str
    access_log: bool
    shutdown_timeout: float


def _build_app(async_engine: AsyncLLMEngine, server_config: ServerConfig) -> FastAPI:
    from nanovllm.server.app import build_app_for, tokenizer_for

    return build_app_for(async_engine, tokenizer_for(async_engine.info), server_config)


def serve(async_engine: AsyncLLMEngine, app: FastAPI, options: ServeOptions, listen: socket.socket,
          security: SecurityConfig, on_started: Callable[[], None] = lambda: None) -> int:
    """Run one API process's HTTP server on `listen` until shutdown; -> the exit status."""
    from nanovllm.server.security import uvicorn_settings

    log = logging.getLogger("nanovllm.server")
    config = uvicorn.Config(app, log_level=options.log_level, access_log=options.access_log,
                            timeout_graceful_shutdown=int(options.shutdown_timeout) + 5, **uvicorn_settings(security))
    graceful = GracefulServer(config, drain=async_engine.drain, shutdown_timeout=options.shutdown_timeout,
                              peers=async_engine.peers, on_started=on_started)
    async_engine.on_dead = graceful.stop_on_engine_death
    graceful.run(sockets=[listen])
    if graceful.engine_died:
        log.error("the engine core died; the server stopped")
        async_engine.kill_processes()
        # Every response has its error already; skip the interpreter's clean-up (seconds with torch loaded).
        logging.shutdown()
        os._exit(1)
    return 0


def run_api_server(info: CoreInfo, addresses: CoreAddresses, client_index: int, server_config: ServerConfig,
                   options: ServeOptions, started: multiprocessing.synchronize.Event) -> None:
    """An extra API process (--api-server-count): its own event loop, tokenizer and HTTP server, on
    the same port (SO_REUSEPORT: the kernel spreads connections), talking to the same engine core."""
    from nanovllm.engine.async_engine import AsyncLLMEngine

    logging.basicConfig(level=options.log_level.upper(), format=LOG_FORMAT)
    async_engine = AsyncLLMEngine(info, addresses, server_config.max_waiting, client_index=client_index)
    listen = _listening_socket(options.host, options.port, shared=True)
    raise SystemExit(serve(async_engine, _build_app(async_engine, server_config), options, listen,
                           server_config.security, on_started=started.set))


def _listening_socket(host: str, port: int, shared: bool) -> socket.socket:
    """A bound TCP socket; `shared`: several processes may bind the same port (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listen = socket.socket(family, socket.SOCK_STREAM)
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listen.bind((host, port))
    listen.set_inheritable(True)
    return listen


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT also drains the engine (requests finish or
    are aborted within the grace period) and `run` then returns normally, so the process exits 0;
    uvicorn alone would re-raise the signal once shut down."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], shutdown_timeout: float,
                 peers: list[multiprocessing.Process], on_started: Callable[[], None]):
        super().__init__(config)
        self.on_started = on_started
        self.drain = drain
        self.peers = peers   # the other API processes: each drains its own requests
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.engine_died = False

    def stop_on_engine_death(self) -> None:
        """The core is gone (its requests have their errors already): stop serving, exit non-zero."""
        self.engine_died = True
        self.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        for peer in self.peers:
            if peer.pid is not None and peer.is_alive():
                os.kill(peer.pid, sig)
        if self.should_exit:   # a second signal: stop waiting
            self.force_exit = True
            return
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self.drain(self.shutdown_timeout))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
