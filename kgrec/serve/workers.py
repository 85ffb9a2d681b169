"""``kgrec serve --workers N``: N server processes on one port, each with its own listening socket.

Why not ``uvicorn.run(workers=N)``: its workers share one listening socket, and an idle worker accepts every
connection that is waiting when it wakes up. A load balancer or a benchmark that opens its connections at once
(keep-alive clients, ``wrk -c32``) then lands them all on one process: measured at 100,000 items, two workers used
one core between them (257 /search req/s, the machine half idle). Here every worker binds the port with
``SO_REUSEPORT``, so the kernel spreads new connections over the workers' sockets (by a hash of the connection's
addresses: even on average, not exactly).

The hash spreads connections evenly only on average: 32 keep-alive connections land 16/16 or 18/14 or 20/12 by
chance, and a closed-loop client's latency follows the busier worker (measured at 100,000 items, same code: p99 76 ms
at 16/16, 94 ms at 18/14). So each worker also runs a :class:`ConnectionBalancer`: the workers publish how many
connections they hold in a small shared array, and a worker holding more than its share (total / N, rounded up)
answers that many of its next responses with ``Connection: close``; the clients reconnect (HTTP/1.1 allows the
server to close a keep-alive connection after any response) and the kernel hashes the new connections afresh,
so within a few rounds every worker holds its share.

Each worker is a spawned process that builds its app with :func:`kgrec.serve.app.app_from_env` (the bundle path and
the resolved config come through the environment). The parent only supervises: SIGINT/SIGTERM stop the workers
gracefully, and if one worker exits the others are stopped too (the service is either whole or down).
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import sys
import time
from typing import Any

from kgrec.errors import KgrecError

logger = logging.getLogger(__name__)


def reuseport_supported() -> bool:
    """Whether this platform has ``SO_REUSEPORT`` with load balancing (Linux 3.9+)."""
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` (not yet listening)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise KgrecError(f"cannot bind {host}:{port} for kgrec serve: {exc} (is the port in use?)") from exc
    return sock


class ConnectionBalancer:
    """ASGI wrapper: close the connections this worker holds beyond its share, one response at a time.

    ``held()`` is this worker's number of open connections (uvicorn's server state); ``counts`` a shared array with
    one slot per worker, where each worker writes its own count on every request (lock-free: a stale read only
    delays a correction). When ``held`` exceeds ``ceil(sum(counts) / len(counts))`` by ``e``, the next ``e``
    responses carry ``Connection: close`` (uvicorn then closes the connection after the response), and the worker
    waits ``cooldown_s`` before judging again, so the counts can settle.
    """

    def __init__(self, app: Any, held: Any, counts: Any, index: int, cooldown_s: float = 0.25) -> None:
        self.app, self.held, self.counts, self.index, self.cooldown_s = app, held, counts, index, cooldown_s
        self._budget = 0
        self._quiet_until = 0.0
        self.closed = 0  # connections closed for balance (for logs and tests)

    def __getattr__(self, name: str) -> Any:  # ``state``, ``openapi``... of the wrapped app
        return getattr(self.app, name)

    def _close_this_one(self) -> bool:
        mine = int(self.held())
        self.counts[self.index] = mine
        now = time.monotonic()
        if now < self._quiet_until:
            if self._budget > 0:
                self._budget -= 1
                return True
            return False
        counts = self.counts[:]
        if min(counts) < 0:  # a worker that has not answered yet: its share is unknown
            return False
        total = sum(counts)
        excess = mine - -(-total // len(self.counts))
        if excess <= 0:
            return False
        self._budget, self._quiet_until = excess - 1, now + self.cooldown_s
        return True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._close_this_one():
            await self.app(scope, receive, send)
            return
        self.closed += 1

        async def send_and_close(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_and_close)


# set in each worker process before uvicorn loads the app: (uvicorn server, shared counts, worker index)
_WORKER: dict[str, Any] = {}


def balanced_app_from_env() -> Any:
    """App factory of a worker: :func:`kgrec.serve.app.app_from_env` wrapped in a :class:`ConnectionBalancer`."""
    from kgrec.serve.app import app_from_env

    app = app_from_env()
    if not _WORKER or _WORKER["counts"] is None:
        return app
    server = _WORKER["server"]
    return ConnectionBalancer(app, lambda: len(server.server_state.connections), _WORKER["counts"],
                              _WORKER["index"])


def _worker(host: str, port: int, log_level: str, backlog: int, counts: Any = None, index: int = 0) -> None:
    """Body of one worker process: listen first (connections queue while the bundle loads), then serve."""
    import uvicorn

    sock = reuseport_socket(host, port)
    sock.listen(backlog)
    config = uvicorn.Config("kgrec.serve.workers:balanced_app_from_env", factory=True, host=host, port=port,
                            log_level=log_level, access_log=False, backlog=backlog)
    server = uvicorn.Server(config)
    _WORKER.update(server=server, counts=counts, index=index)
    server.run(sockets=[sock])


def serve_workers(n: int, host: str, port: int, *, log_level: str = "info", backlog: int = 2048,
                  stop_timeout_s: float = 30.0, balance: bool = True) -> int:
    """Run ``n`` worker processes on ``host:port`` until a signal or a worker exit; returns the exit status.

    The caller sets ``KGREC_SERVE_BUNDLE_PATH`` / ``KGREC_SERVE_CONFIG_YAML`` in the environment first (see
    ``kgrec serve``). ``port=0`` picks a free port (logged); the parent keeps a bound, non-listening socket in the
    reuse-port group so that the port stays reserved while the workers start. ``balance``: run the
    :class:`ConnectionBalancer` in every worker (``serve.balance_connections``).
    """
    if n < 1:
        raise ValueError(f"serve_workers needs at least one worker, got {n}")
    holder = reuseport_socket(host, port)
    port = holder.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.RawArray("i", [-1] * n) if balance and n > 1 else None  # -1: not known yet
    procs = [ctx.Process(target=_worker, args=(host, port, log_level, backlog, counts, i), name=f"kgrec-serve-{i}")
             for i in range(n)]
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        for p in procs:
            p.start()
        logger.info("started %d worker processes on %s:%d (SO_REUSEPORT): pids %s", n, host, port,
                    [p.pid for p in procs])
        while stopping["signal"] is None:
            done = multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
            if done:
                dead = [p for p in procs if not p.is_alive()]
                logger.error("kgrec serve worker(s) %s exited (codes %s); stopping the others",
                             [p.pid for p in dead], [p.exitcode for p in dead])
                status = 1
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
        deadline = time.monotonic() + stop_timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("worker %d did not stop in %.0f s; killing it", p.pid, stop_timeout_s)
                p.kill()
                p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        holder.close()
    return status
