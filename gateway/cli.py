"""`sdxl-broker gateway`: the HTTP/WebSocket gateway (A1111 API, /v1, dashboard) on uvicorn,
a ZeroMQ client of a running broker. `serve --http HOST:PORT` starts the same thing."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

log = logging.getLogger(__name__)

DEFAULT_HTTP = "127.0.0.1:7860"  # A1111's port, so tools find it where they expect it
LOOPBACK_NAMES = ("localhost",)


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, token: str | None, insecure: bool) -> str | None:
    """Why binding `host` is refused, or None: a non-loopback address needs a token or an
    explicit --http-insecure."""
    if is_loopback(host) or token or insecure:
        return None
    return (f"refusing to bind the gateway to {host}: it is reachable from other machines. "
            "Pass --http-token TOKEN (clients send Authorization: Bearer TOKEN) or, on a "
            "trusted network, --http-insecure")


def add_http_arguments(parser: argparse.ArgumentParser, *, http_default: str | None) -> None:
    """The flags `gateway` and `serve --http` share."""
    parser.add_argument("--http", default=http_default, type=parse_host_port, metavar="HOST:PORT",
                        help="where the HTTP/WebSocket gateway listens"
                             + (f" (default {http_default})" if http_default else " (off unless given)"))
    parser.add_argument("--http-token", default=os.environ.get("SDXL_BROKER_HTTP_TOKEN"),
                        help="require Authorization: Bearer TOKEN on every HTTP/WebSocket request "
                             "(default $SDXL_BROKER_HTTP_TOKEN); needed to bind a non-loopback address")
    parser.add_argument("--http-insecure", action="store_true",
                        help="allow a non-loopback address without a token (trusted networks only)")
    parser.add_argument("--http-cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser calls from ORIGIN (repeatable); CORS is off without it")
    parser.add_argument("--http-max-body-mb", type=float, default=64.0,
                        help="largest request body accepted, MB (default 64)")
    parser.add_argument("--http-default-model", default=None, metavar="NAME",
                        help="A1111's sd_model_checkpoint until a client sets one via /sdapi/v1/options")


def add_arguments(parser: argparse.ArgumentParser, _command: str = "gateway") -> None:
    from clients.client import add_connection_arguments

    add_connection_arguments(parser)
    add_http_arguments(parser, http_default=DEFAULT_HTTP)
    parser.add_argument("--output-dir", default=None,
                        help="the workers' output root, when it is on this host: /v1/images serves "
                             "files from it (and nothing outside it)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from_args(args, output_dir: str | None):
    """GatewaySettings from the flags; the broker connection (endpoint, CURVE keys) as every
    client command reads it (clients.client.connection_from_args). ValueError/OSError when a
    key file is missing or only one of the two CURVE flags is given."""
    from clients.client import connection_from_args
    from gateway.app import GatewaySettings

    connection = connection_from_args(args)
    return GatewaySettings(broker_endpoint=connection["endpoint"], output_dir=output_dir,
                           token=args.http_token, cors_origins=list(args.http_cors_origin or []),
                           max_body_mb=args.http_max_body_mb, default_model=args.http_default_model,
                           curve_server_key=connection.get("curve_server_key"),
                           curve_client_keys=connection.get("curve_client_keys"))


def serve_gateway(settings, host: str, port: int, log_level: str = "info") -> None:
    """Run uvicorn in this thread until it is stopped (SIGINT/SIGTERM)."""
    import uvicorn

    from gateway.app import create_app

    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level=log_level,
                            ws_max_size=int(settings.max_body_mb * 1024 * 1024),
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    log.info("gateway on http://%s:%d -> broker %s", host, port, settings.broker_endpoint)
    server.run()


def run(args) -> int:
    host, port = args.http
    problem = exposure_problem(host, args.http_token, args.http_insecure)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args, args.output_dir)
    except (OSError, ValueError) as exc:
        print(f"sdxl-broker gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"gateway http://{host}:{port} -> {settings.broker_endpoint}"
          + (" (CURVE)" if settings.curve_server_key else ""), flush=True)
    serve_gateway(settings, host, port, args.log_level)
    return 0
