"""The devices' entry to the SuperLink: HTTPS in, the Fleet API routes only.

Flower 1.41 serves every API on the SuperLink's one port (``--host/--port``):
the Fleet API for SuperNodes (``/v1/fleet/*``), the Control API for the ``flwr``
CLI (``/v1/control/*``: start runs, register and unregister keys, ...) and the
runtime API of its ServerApps (``/v1/runtime/*``). Open-source Flower has no
account authentication on the Control API (OIDC, ``FLWR_OIDC_ENABLED=1``, is not
in the open-source package), no separate listener for it (``--control-api-address``
is deprecated and ignored), and the runtime API's shared secret
(``--superexec-auth-secret-file``) is ignored with ``--isolation subprocess``.
So whoever reaches that port and trusts the CA may start a run (run code on the
server and, through the ClientApp, on every node) or register a key.

The front keeps devices off all of that. The SuperLink listens on 127.0.0.1
(the operator's ``flwr`` CLI reaches it there, or through an SSH tunnel); this
process listens where devices dial, terminates TLS with the server's
certificate, and forwards a request to the SuperLink (over TLS, checking its
certificate against the CA) only if it is one of Flower's Fleet API routes
(``POST /v1/fleet/<name>``, :data:`FLEET_ROUTES`) or ``GET /health``. Anything
else (the Control API, the runtime API, ``/docs``, another method, a query
string, a path with ``..`` or ``%``-escapes) is answered ``403`` here and never
reaches the SuperLink. Node authentication stays Flower's: the SuperLink checks
every Fleet call's signature and node id, and refuses Fleet self-registration
while ``--enable-supernode-auth`` is on.

Usage (on the server; the SuperLink on ``--host 127.0.0.1 --port 9092``)::

    python -m deploy.fleet_front --listen 0.0.0.0:9093 --upstream 127.0.0.1:9092 \\
        --ssl-certfile pki/server.pem --ssl-keyfile pki/server.key \\
        --ssl-ca-certfile pki/ca.crt
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

# Flower's Fleet API routes (flwr 1.41, ``flwr.superlink.routers.fleet.router``;
# tests/deploy/test_deploy_control.py checks this list against it).
FLEET_ROUTES = frozenset(
    ("POST", f"/v1/fleet/{name}")
    for name in (
        "register-node",  # refused by the SuperLink under --enable-supernode-auth
        "activate-node",
        "deactivate-node",
        "unregister-node",  # refused by the SuperLink under --enable-supernode-auth
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
HEALTH_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})
ALLOWED = FLEET_ROUTES | HEALTH_ROUTES

# Not forwarded: connection-level headers, and those the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)
FORBIDDEN_ACTION = 10  # flwr's ApiErrorCode.FORBIDDEN_ACTION: the CLI prints `detail`
DEFAULT_MAX_BODY_MB = 64.0  # Flower pushes objects in chunks of at most 5 MiB

logger = logging.getLogger("deploy.fleet_front")


def allowed(method: str, raw_path: bytes, query: bytes) -> str | None:
    """The route to forward, or None: exact Fleet API routes only.

    The raw path is matched as sent (no ``%``-decoding, no ``..``), so what is
    forwarded is exactly a route of :data:`ALLOWED`.
    """
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if query or (method, path) not in ALLOWED:
        return None
    return path


def create_app(
    upstream: str,
    verify: ssl.SSLContext | bool,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
) -> Any:
    """The front as an ASGI app (Starlette) forwarding to ``upstream`` (a URL)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    clients: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=upstream,
            verify=verify,
            timeout=httpx.Timeout(120.0, connect=10.0),
        ) as client:
            clients.append(client)
            yield
            clients.clear()

    def refuse(request: Request, status: int, detail: str) -> Response:
        peer = request.client.host if request.client else "?"
        logger.warning(
            "refused %s %s from %s: %s",
            request.method,
            request.scope.get("raw_path", b"").decode("ascii", "replace")[:200],
            peer,
            detail,
        )
        return JSONResponse(
            {"code": FORBIDDEN_ACTION, "detail": detail}, status_code=status
        )

    async def forward(request: Request) -> Response:
        path = allowed(
            request.method,
            request.scope.get("raw_path") or request.url.path.encode(),
            request.scope.get("query_string", b""),
        )
        if path is None:
            return refuse(
                request,
                403,
                "this endpoint serves devices the Flower Fleet API only; the "
                "Control API (flwr run, flwr supernode register, ...) is reachable "
                "on the SuperLink's own address, from the operator's machine",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return refuse(request, 413, f"request body over {max_body_bytes} bytes")
        headers = [
            (k, v)
            for k, v in request.headers.raw
            if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        try:
            resp = await clients[0].request(
                request.method, path, content=bytes(body), headers=headers
            )
        except httpx.TransportError as e:
            # SuperNodes retry on 502 (e.g. while the SuperLink restarts).
            logger.warning("upstream %s: %s: %s", upstream, type(e).__name__, e)
            return Response(b"upstream unavailable", status_code=502)
        out_headers = {
            k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP
        }
        return Response(resp.content, status_code=resp.status_code, headers=out_headers)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(
        routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan
    )


def _host_port(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"{flag}={address!r}: give HOST:PORT, e.g. 0.0.0.0:9093")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deploy.fleet_front",
        description="HTTPS front for SuperNodes: forwards Flower's Fleet API "
        "routes to the SuperLink, refuses everything else (Control, runtime API).",
    )
    p.add_argument("--listen", required=True, help="HOST:PORT devices dial")
    p.add_argument(
        "--upstream", required=True, help="the SuperLink's HOST:PORT (loopback)"
    )
    p.add_argument("--ssl-certfile", required=True, help="server certificate (PEM)")
    p.add_argument("--ssl-keyfile", required=True, help="its private key")
    p.add_argument(
        "--ssl-ca-certfile", required=True, help="CA that signed the SuperLink's"
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body forwarded (default {DEFAULT_MAX_BODY_MB:g})",
    )
    args = p.parse_args(argv)
    import uvicorn

    host, port = _host_port(args.listen, "--listen")
    up_host, up_port = _host_port(args.upstream, "--upstream")
    upstream = f"https://{up_host}:{up_port}"
    verify = ssl.create_default_context(cafile=args.ssl_ca_certfile)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    logger.info(
        "Fleet front on https://%s:%d -> %s; forwarding only %s and /health",
        host,
        port,
        upstream,
        ", ".join(sorted(path for _, path in FLEET_ROUTES)),
    )
    uvicorn.run(
        create_app(upstream, verify, int(args.max_body_mb * 2**20)),
        host=host,
        port=port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level="info",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
