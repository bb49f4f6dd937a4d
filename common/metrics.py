"""Serving a daemon's Prometheus registry.

Each daemon declares its metrics in one module of its own (`producer/metrics.py`,
`consumer/metrics.py`) on a registry it creates and passes around: no global registry,
so tests can run several daemons' metrics in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from saestream.common.errors import UserError


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> None:
    """Serve `/metrics` for `registry` on a daemon thread; port 0 disables serving.
    UserError when the address cannot be bound (a port in use, an unknown address)."""
    if not port:
        return
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise UserError(f"cannot serve /metrics on {addr}:{port}: {exc}") from exc
