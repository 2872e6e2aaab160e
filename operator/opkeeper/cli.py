"""The ``opkeeper`` command line: one argparse subcommand per entry point.

Each subcommand is a pair of functions — ``_<name>_parser`` adds its flags,
``_<name>`` runs it — registered in :data:`COMMANDS`, so adding a
subcommand touches nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
from collections.abc import Callable, Sequence

from opkeeper import kube

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the ``extra={...}`` fields of the call as keys
    (operation, id, from, to, reason...), for log pipelines that index fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _setup_logging(*, level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # kopf logs every handled watch event at INFO; our reconciler logs the transitions.
    logging.getLogger("kopf").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def _controller_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig path (default: $KUBECONFIG, then"
        " ~/.kube/config, then the in-cluster service account)",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        default=[],
        help="namespace (or glob) to serve; repeatable",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus /metrics port (default 0: off)"
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no kopf peering (a single controller)"
    )
    parser.add_argument(
        "--system-namespace",
        default="opkeeper-system",
        help="namespace of the id counter (default opkeeper-system)",
    )
    parser.add_argument("--workers", type=int, default=32, help="concurrent reconciles")
    parser.add_argument(
        "--no-events", action="store_true", help="do not post a Kubernetes Event per transition"
    )
    parser.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        type=_webhook_allow_entry,
        metavar="HOST|CIDR",
        help="let webhooks call only this host name or address range (repeatable); a listed"
        " CIDR may cover loopback or link-local addresses. Default: anywhere but loopback,"
        " link-local, unspecified and multicast addresses. The API server: never",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def _webhook_allow_entry(value: str) -> str:
    """Validate a --webhook-allow value now, so a typo stops the CLI, not the controller."""
    from opkeeper.executors import webhook  # the controller's import; the gateway needs none

    try:
        webhook.allow_entry(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def _controller(args: argparse.Namespace) -> int:
    from opkeeper import controller  # kopf is a heavy import: only for this subcommand

    _setup_logging(level=args.log_level, fmt=args.log_format)
    settings = controller.Settings(
        namespaces=tuple(args.namespaces),
        all_namespaces=args.all_namespaces,
        metrics_port=args.metrics_port,
        standalone=args.standalone,
        system_namespace=args.system_namespace,
        workers=args.workers,
        post_events=not args.no_events,
        webhook_allow=tuple(args.webhook_allow),
    )
    credentials = kube.Credentials.auto(args.kubeconfig)
    asyncio.run(controller.run(settings=settings, credentials=credentials))
    return 0


COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "controller": ("run the Operation controller (kopf)", _controller_parser, _controller),
}
"""Subcommands: name -> (help, add-flags function, run function)."""


def _gateway_parser(parser: argparse.ArgumentParser) -> None:
    from opkeeper.gateway import cli as gateway_cli

    gateway_cli.add_arguments(parser)


def _gateway(args: argparse.Namespace) -> int:
    from opkeeper.gateway import cli as gateway_cli

    return gateway_cli.run(args)


COMMANDS["gateway"] = ("run the XML-RPC gateway, or mint a demo API key", _gateway_parser, _gateway)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opkeeper", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    raise SystemExit(main())
