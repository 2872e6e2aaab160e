"""``opkeeper gateway``: run the gateway.

Its API keys are made by ``opkeeper apikey`` (:mod:`opkeeper.apikeys`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os

from opkeeper import logs
from opkeeper.gateway import aggregated, auth, calllog, calllogs, ratelimit, server, service, xmlrpc
from opkeeper.gateway.dialects import cloudstack

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
        default=os.environ.get(calllogs.ENV, defaults.call_log_path),
        help="the gocept call log: a SQLite file (put it on a volume), or a"
        " postgresql://user:password@host/db DSN shared by several replicas"
        f" (default ${calllogs.ENV}, then {defaults.call_log_path}; give a DSN with a"
        f" password through ${calllogs.ENV}, which no process listing shows)",
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
        "--aggregated-cert",
        help="serving certificate (PEM) of the aggregated API rpc.opkeeper.dev; with"
        " --aggregated-key it turns the aggregated API's TLS listener on (docs/aggregated-api.md)",
    )
    parser.add_argument("--aggregated-key", help="the serving certificate's private key (PEM)")
    aggregated_defaults = aggregated.Settings(cert_file="", key_file="")
    parser.add_argument(
        "--aggregated-host",
        default=aggregated_defaults.host,
        help=f"aggregated API listen address (default {aggregated_defaults.host})",
    )
    parser.add_argument(
        "--aggregated-port",
        type=int,
        default=aggregated_defaults.port,
        help=f"aggregated API TLS port (default {aggregated_defaults.port})",
    )
    parser.add_argument(
        "--cloudstack-command",
        action="append",
        default=[],
        metavar="COMMAND=TYPE",
        help="a CloudStack async command served on /client/api and the operation type it"
        " creates, e.g. deployVirtualMachine=vm_deploy; repeatable (the executor still"
        " comes from --executor)",
    )
    parser.add_argument(
        "--write-visible-timeout",
        type=float,
        default=service.Settings().write_visible_timeout_seconds,
        metavar="SECONDS",
        help="longest wait of a legacy write for its effect to be readable (default"
        f" {service.Settings().write_visible_timeout_seconds:g}); past it the call succeeds"
        " anyway and opkeeper_gateway_writes_not_visible_total counts it",
    )
    budget = ratelimit.Settings()
    parser.add_argument(
        "--tenant-write-rate",
        type=float,
        default=budget.writes_per_second,
        metavar="PER_SECOND",
        help="sustained legacy writes per tenant namespace and gateway process; more are"
        f" answered 'temporarily unavailable' (default {budget.writes_per_second:g}; 0: no limit)",
    )
    parser.add_argument(
        "--tenant-write-burst",
        type=int,
        default=budget.burst,
        metavar="WRITES",
        help=f"writes a tenant may make at once after a quiet spell (default {budget.burst})",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=logs.DEFAULT_FORMAT)


def settings_from(args: argparse.Namespace) -> server.Settings:
    if args.tenant_write_rate < 0 or args.tenant_write_burst < 1:
        raise SystemExit(
            "opkeeper gateway: --tenant-write-rate must be >= 0 and --tenant-write-burst >= 1"
        )
    key_namespace = None if args.key_namespace == "*" else args.key_namespace
    return server.Settings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        call_log_path=args.call_log,
        system_namespace=args.system_namespace,
        keyring=auth.KeyRingSettings(namespace=key_namespace),
        sessions=dataclasses.replace(auth.SessionSettings(), ttl_seconds=args.session_ttl),
        service=service.Settings(
            executors=server.executors_from(args.executor),
            write_visible_timeout_seconds=args.write_visible_timeout,
            writes=ratelimit.Settings(
                writes_per_second=args.tenant_write_rate, burst=args.tenant_write_burst
            ),
        ),
        limits=dataclasses.replace(xmlrpc.DEFAULT_LIMITS, max_body_bytes=args.max_body),
        cloudstack=cloudstack.Settings(commands=cloudstack.commands_from(args.cloudstack_command)),
        max_connections=args.max_connections,
        header_timeout_seconds=args.header_timeout,
        keepalive_timeout_seconds=args.keepalive_timeout,
        shutdown_timeout_seconds=args.shutdown_timeout,
        aggregated=_aggregated_from(args),
    )


def _aggregated_from(args: argparse.Namespace) -> aggregated.Settings | None:
    if not args.aggregated_cert and not args.aggregated_key:
        return None
    if not (args.aggregated_cert and args.aggregated_key):
        raise SystemExit("opkeeper gateway: --aggregated-cert and --aggregated-key go together")
    return aggregated.Settings(
        cert_file=args.aggregated_cert,
        key_file=args.aggregated_key,
        host=args.aggregated_host,
        port=args.aggregated_port,
    )


def run(args: argparse.Namespace) -> int:
    logs.setup(level=args.log_level, fmt=args.log_format)
    settings = settings_from(args)
    log.info("call log: %s (kept %s)", calllogs.shown(settings.call_log_path), calllog.RETENTION)
    if settings.workers > 1:
        return server.serve_workers(
            settings=settings,
            kubeconfig=args.kubeconfig,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    asyncio.run(server.serve(settings=settings, kubeconfig=args.kubeconfig))
    return 0
