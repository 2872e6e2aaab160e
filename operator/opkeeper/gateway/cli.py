"""``opkeeper gateway``: run the gateway, or mint a demo API key and print a client snippet.

The snippet is what ``make dev`` shows: a Python 3 ``xmlrpc.client`` session
that logs in with the fresh key and lists the demo namespace's operations,
ready to paste. The key is printed once, here, and stored only as a hash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import secrets
import textwrap

from opkeeper import kube
from opkeeper.gateway import auth, calllog, kubeio, server, service, xmlrpc

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = server.Settings()
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig path (default: $KUBECONFIG, then"
        " ~/.kube/config, then the in-cluster service account)",
    )
    parser.add_argument(
        "--host", default=defaults.host, help=f"listen address (default {defaults.host})"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help=f"listen port (default {defaults.port})"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="gateway processes sharing the port (SO_REUSEPORT), each with its own"
        f" watches and cache (default {defaults.workers})",
    )
    parser.add_argument(
        "--call-log",
        default=defaults.call_log_path,
        help="SQLite file of the gocept call log (put it on a volume)",
    )
    parser.add_argument(
        "--key-namespace",
        default=defaults.keyring.namespace,
        help="namespace of the API key Secrets; '*' reads every namespace,"
        " where a key may only grant its own namespace",
    )
    parser.add_argument(
        "--system-namespace",
        default=defaults.system_namespace,
        help="namespace of the id counter (shared with the controller)",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=defaults.sessions.ttl_seconds,
        help="login session lifetime in seconds",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=defaults.limits.max_body_bytes,
        help="largest request body in bytes",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="connections open at once per process; more are closed at once"
        f" (default {defaults.max_connections})",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_seconds,
        help="seconds a new connection may take to send its first request's headers"
        f" (default {defaults.header_timeout_seconds:g})",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=defaults.keepalive_timeout_seconds,
        help="seconds an idle connection is kept open after a response"
        f" (default {defaults.keepalive_timeout_seconds:g})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout_seconds,
        help="seconds requests in flight may take to finish on SIGTERM before they are"
        f" cancelled (default {defaults.shutdown_timeout_seconds:g})",
    )
    parser.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="TYPE=JSON",
        help="executor of operations of TYPE created through the gateway,"
        ' e.g. domain_check=\'{"builtin": {"action": "noop"}}\'; repeatable'
        " (default for other types: external)",
    )
    parser.add_argument(
        "--demo-key",
        metavar="NAMESPACE",
        help="instead of serving: create an API key for NAMESPACE, print a"
        " ready-to-paste Python snippet and exit",
    )
    parser.add_argument("--demo-user", default="demo", help="user id of the demo key")
    parser.add_argument(
        "--url", help="gateway URL the demo snippet uses (default http://HOST:PORT/xmlrpc)"
    )
    parser.add_argument("--log-level", default="info")


def settings_from(args: argparse.Namespace) -> server.Settings:
    key_namespace = None if args.key_namespace == "*" else args.key_namespace
    return server.Settings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        call_log_path=args.call_log,
        system_namespace=args.system_namespace,
        keyring=auth.KeyRingSettings(namespace=key_namespace),
        sessions=dataclasses.replace(auth.SessionSettings(), ttl_seconds=args.session_ttl),
        service=service.Settings(executors=server.executors_from(args.executor)),
        limits=dataclasses.replace(xmlrpc.DEFAULT_LIMITS, max_body_bytes=args.max_body),
        max_connections=args.max_connections,
        header_timeout_seconds=args.header_timeout,
        keepalive_timeout_seconds=args.keepalive_timeout,
        shutdown_timeout_seconds=args.shutdown_timeout,
    )


def snippet(*, url: str, key: str, namespace: str) -> str:
    """A Python 3 xmlrpc.client session against the gateway, ready to paste."""
    return textwrap.dedent(
        f"""\
        import pprint, xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("{url}")
        session = proxy.login("{key}")  # API key of namespace {namespace}
        for opid in proxy.operation_list(session, {{}}):
            pprint.pprint(proxy.operation_details(session, opid))
        """
    )


async def create_demo_key(
    client: kube.Client, *, key_namespace: str, tenant: str, user_id: str
) -> str:
    """Create an API key Secret granting ``tenant`` to ``user_id``; returns the key."""
    key = auth.new_key()
    name = f"api-key-{tenant}-{secrets.token_hex(3)}"[:63]
    with contextlib.suppress(kube.AlreadyExists):
        await client.create(
            kube.NAMESPACES,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": key_namespace}},
        )
    await client.create(
        kubeio.SECRETS,
        auth.key_secret(
            name=name, namespace=key_namespace, key=key, user_id=user_id, tenant=tenant
        ),
        namespace=key_namespace,
    )
    return key


async def _demo(args: argparse.Namespace, settings: server.Settings) -> int:
    key_namespace = settings.keyring.namespace or args.demo_key
    async with kube.Client(kube.Credentials.auto(args.kubeconfig)) as client:
        key = await create_demo_key(
            client, key_namespace=key_namespace, tenant=args.demo_key, user_id=args.demo_user
        )
    url = args.url or f"http://{settings.host}:{settings.port}/xmlrpc"
    print(snippet(url=url, key=key, namespace=args.demo_key))
    return 0


def run(args: argparse.Namespace) -> int:
    server.setup_logging(level=args.log_level)
    settings = settings_from(args)
    if args.demo_key:
        return asyncio.run(_demo(args, settings))
    log.info("call log: %s (kept %s)", settings.call_log_path, calllog.RETENTION)
    if settings.workers > 1:
        return server.serve_workers(
            settings=settings, kubeconfig=args.kubeconfig, log_level=args.log_level
        )
    asyncio.run(server.serve(settings=settings, kubeconfig=args.kubeconfig))
    return 0
