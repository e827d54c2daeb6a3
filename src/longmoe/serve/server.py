"""`longmoe serve`: load a model, bind the socket, run uvicorn, and shut down gracefully on SIGTERM / Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("longmoe.serve")


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn, plus: on SIGTERM, requests in flight get `grace` seconds to finish (new ones are refused with 503),
    then streams still running end with an error event saying the server is shutting down; then the process exits.
    The ready line goes to stderr once the app has started, with the port actually bound (for --port 0)."""

    def __init__(self, config: uvicorn.Config, runner: Any, grace: float, ready: str):
        super().__init__(config)
        self.runner, self.grace, self.ready = runner, grace, ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("signal %d: finishing %d request(s) in flight (at most %.0f s)", sig, self.runner.in_flight,
                     self.grace)  # fmt: skip
            self.runner.begin_drain(self.grace)
        if sig == signal.SIGTERM:
            # uvicorn would re-raise SIGTERM once shut down (exit status -15); a finished drain exits with 0. A second
            # SIGTERM stops waiting for requests.
            self.force_exit = self.should_exit
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)


def serve(model: str | None, *, model_name: str | None, host: str, port: int, api_key: str | None,
          insecure_no_auth: bool, data_dir: str | None, dtype: str = "auto", device: str = "cpu",
          kv_dtype: str = "auto", chunk_size: int = 2048, max_context: int | None = None,
          max_output_tokens: int | None = None, max_queue: int = 64, max_request_bytes: int = 64 << 20,
          shutdown_timeout: float = 30.0, log_level: str = "info") -> int:  # fmt: skip
    if not api_key and not insecure_no_auth and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use it. Give --api-key "
            "(or LONGMOE_API_KEY), bind to 127.0.0.1, or pass --insecure-no-auth"
        )
    for flag, value, low in (("--port", port, 0), ("--max-queue", max_queue, 1), ("--chunk-size", chunk_size, 1),
                             ("--max-request-bytes", max_request_bytes, 1024)):  # fmt: skip
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if max_output_tokens is not None and max_output_tokens < 1:
        raise ValueError(f"--max-output-tokens must be >= 1, got {max_output_tokens}")
    if shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import longmoe

    from .app import create_app

    name = model_name or (Path(model).resolve().name if model else "longmoe-bundled")
    m = longmoe.load(model, dtype=dtype, device=device, kv_dtype=kv_dtype, chunk_size=chunk_size,
                     max_context=max_context)  # fmt: skip
    sock = bind(host, port)
    app = create_app(m, name, api_key=api_key, data_dir=data_dir, max_queue=max_queue,
                     max_request_bytes=max_request_bytes, max_output_tokens=max_output_tokens)  # fmt: skip
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    ready = f"longmoe serve: models/{name} ready at http://{shown}:{bound} (playground: http://{shown}:{bound}/)"
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)  # fmt: skip
    server = GracefulServer(config, app.state.longmoe.runner, shutdown_timeout, ready)
    server.run(sockets=[sock])
    return 0
