"""`nano-vllm serve [MODEL]`: the OpenAI-compatible server under uvicorn.

    nano-vllm serve                                   # the embedded SmolLM2 on http://127.0.0.1:8000
    nano-vllm serve ./my-model --port 9000 --api-key secret --max-num-seqs 32

It binds 127.0.0.1 unless told otherwise (`--host 0.0.0.0` opens it to the
network; give it an `--api-key` then). The key may also come from the
NANO_VLLM_API_KEY environment variable, which keeps it out of `ps`.

SIGTERM (or Ctrl-C) shuts down gracefully: the listening socket closes, new
requests are refused, requests in flight get `--shutdown-timeout` seconds to
finish and are then aborted (their streams end with finish_reason "abort"),
and the process exits 0. A second Ctrl-C quits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
from pathlib import Path
from types import FrameType
from typing import Awaitable, Callable

import uvicorn

API_KEY_ENV = "NANO_VLLM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanovllm.engine_args import add_engine_args
    from nanovllm.server.app import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING

    parser.add_argument("model", nargs="?", default=None,
                        help="HF directory, .gguf or llama2.c .bin (default: the embedded SmolLM2-135M-Instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", default=None,
                        help="the name clients put in `model` (default: the model's directory or file stem)")
    server.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on /v1/ (or set {API_KEY_ENV})")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 before they are parsed")
    server.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="queued sequences beyond which new requests get 503")
    server.add_argument("--log-interval", type=float, default=5.0,
                        help="seconds between throughput log lines while busy")
    server.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds requests in flight may take to finish before they are aborted")
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
    from nanovllm.engine_args import engine_config_from_args
    from nanovllm.server.app import ServerConfig, build_app

    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    server_config = ServerConfig(served_model_name=args.served_model_name, api_key=api_key,
                                 max_request_bytes=args.max_request_bytes, max_waiting=args.max_waiting,
                                 log_interval=args.log_interval,
                                 chat_template=_read_chat_template(args.chat_template),
                                 reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser)
    app = build_app(engine_config_from_args(args, model=args.model), server_config)
    log = logging.getLogger("nanovllm.server")
    if not _is_loopback(args.host) and api_key is None:
        log.warning("binding %s without an API key: anyone who can reach this port can use the model; "
                    "pass --api-key or set %s", args.host, API_KEY_ENV)
    server = app.state.server
    log.info("serving %s as %r (max_model_len %d) on http://%s:%d/v1", server.async_engine.engine.config.model or
             "the embedded model", server.model_name, server.max_model_len, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=int(args.shutdown_timeout) + 5)
    GracefulServer(config, drain=server.async_engine.drain, shutdown_timeout=args.shutdown_timeout).run()
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT also drains the engine (requests finish or
    are aborted within the grace period) and `run` then returns normally, so the process exits 0;
    uvicorn alone would re-raise the signal once shut down."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]], shutdown_timeout: float):
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
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
