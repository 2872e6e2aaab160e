"""The ``opkeeper`` command line: one argparse subcommand per entry point.

Each subcommand is a pair of functions — ``_<name>_parser`` adds its flags,
``_<name>`` runs it — registered in :data:`COMMANDS`, so adding a
subcommand touches nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from opkeeper import apikeys, errors, kube, logs, names


def _setup_logging(*, level: str, fmt: str) -> None:
    logs.setup(level=level, fmt=fmt)
    # kopf logs every handled watch event at INFO; our reconciler logs the transitions.
    logging.getLogger("kopf").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def _controller_parser(parser: argparse.ArgumentParser) -> None:
    from opkeeper.controller import settings  # no kopf import: it is only the dataclass

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
        "--metrics-address",
        default=settings.METRICS_ADDRESS,
        help="address /metrics listens on (default %(default)s: every interface)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="a single controller: act at once, without leader election",
    )
    _leader_election_flags(parser)
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
    parser.add_argument("--log-format", choices=logs.FORMATS, default=logs.DEFAULT_FORMAT)


def _leader_election_flags(parser: argparse.ArgumentParser) -> None:
    from opkeeper.controller import settings  # no kopf import: it is only the dataclass

    election = parser.add_argument_group("leader election (a coordination.k8s.io/v1 Lease)")
    election.add_argument("--lease-name", default=settings.LEASE_NAME, help="the Lease's name")
    election.add_argument(
        "--lease-namespace", default="", help="the Lease's namespace (default: --system-namespace)"
    )
    election.add_argument(
        "--lease-duration",
        type=float,
        default=settings.LEASE_DURATION_SECONDS,
        metavar="SECONDS",
        help="a standby takes an unrenewed Lease over after this long (default %(default)s)",
    )
    election.add_argument(
        "--renew-deadline",
        type=float,
        default=settings.RENEW_DEADLINE_SECONDS,
        metavar="SECONDS",
        help="the leader stops acting when it could not renew for this long (default"
        " %(default)s; less than --lease-duration)",
    )
    election.add_argument(
        "--retry-period",
        type=float,
        default=settings.RETRY_PERIOD_SECONDS,
        metavar="SECONDS",
        help="gap between renewals and between a standby's tries (default %(default)s)",
    )
    election.add_argument(
        "--identity",
        default="",
        help="this replica's name in the Lease (default: $POD_NAME or"
        " the host name, and a random suffix)",
    )


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
        metrics_address=args.metrics_address,
        standalone=args.standalone,
        system_namespace=args.system_namespace,
        workers=args.workers,
        post_events=not args.no_events,
        webhook_allow=tuple(args.webhook_allow),
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_duration_seconds=args.lease_duration,
        renew_deadline_seconds=args.renew_deadline,
        retry_period_seconds=args.retry_period,
        identity=args.identity,
    )
    try:
        controller.leader.Timing(
            lease_duration=settings.lease_duration_seconds,
            renew_deadline=settings.renew_deadline_seconds,
            retry_period=settings.retry_period_seconds,
        )
    except ValueError as exc:
        print(f"opkeeper controller: {exc}", file=sys.stderr)
        return 2
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


COMMANDS["gateway"] = ("run the XML-RPC gateway", _gateway_parser, _gateway)


def _checked(check: Callable[[object], str]) -> Callable[[str], str]:
    """An argparse ``type`` from a boundary check: a refused value stops the command
    with exit code 2 and the check's message, before anything reaches the cluster."""

    def parse(value: str) -> str:
        try:
            return check(value)
        except errors.InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _apikey_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; it is printed once")
    list_ = actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser(
        "revoke", help="delete a key by name, or every key of one user for one namespace"
    )
    for action in (create, list_, revoke):
        action.add_argument(
            "--kubeconfig",
            help="kubeconfig path (default: $KUBECONFIG, then"
            " ~/.kube/config, then the in-cluster service account)",
        )
        action.add_argument(
            "--key-namespace",
            default=apikeys.DEFAULT_KEY_NAMESPACE,
            type=_checked(names.namespace),
            help="namespace of the key Secrets, the gateway's --key-namespace (default"
            f" {apikeys.DEFAULT_KEY_NAMESPACE}); for a gateway run with --key-namespace '*'"
            " give the tenant's namespace, where such a gateway reads its keys",
        )
        action.add_argument(
            "-o",
            "--output",
            choices=("text", "json"),
            default="text",
            help="text for people, json for scripts (default text)",
        )
    create.add_argument(
        "-n",
        "--namespace",
        required=True,
        type=_checked(names.namespace),
        help="the one namespace the key may use",
    )
    create.add_argument(
        "--user",
        required=True,
        type=_checked(apikeys.user_id),
        help="user id (letters, digits, '.', '_', '@', '-'): the Gandi login",
    )
    create.add_argument(
        "--system-namespace",
        default=apikeys.DEFAULT_SYSTEM_NAMESPACE,
        type=_checked(names.namespace),
        help="the gateway's --system-namespace, whose master key the CloudStack secretKey"
        f" derives from (default {apikeys.DEFAULT_SYSTEM_NAMESPACE})",
    )
    create.add_argument(
        "--url",
        default=apikeys.DEFAULT_URL,
        type=_checked(apikeys.gateway_url),
        help=f"the gateway's base URL in the printed snippets (default {apikeys.DEFAULT_URL})",
    )
    list_.add_argument(
        "-n", "--namespace", type=_checked(names.namespace), help="only keys for this namespace"
    )
    revoke.add_argument(
        "name", nargs="?", type=_checked(names.object_name), help="the key's Secret name"
    )
    revoke.add_argument(
        "--user", type=_checked(apikeys.user_id), help="every key of this user (with --namespace)"
    )
    revoke.add_argument(
        "-n",
        "--namespace",
        type=_checked(names.namespace),
        help="the namespace --user's keys grant",
    )
    revoke.set_defaults(usage_error=revoke.error)


def _apikey(args: argparse.Namespace) -> int:
    if args.action == "revoke" and (
        (args.name is None) == (args.user is None)
        or (args.user is None) != (args.namespace is None)
    ):
        args.usage_error("give either NAME, or --user and --namespace")
    try:
        return asyncio.run(_apikey_run(args))
    except errors.OpkeeperError as exc:  # the API server refused or did not answer
        print(f"opkeeper apikey {args.action}: {exc}", file=sys.stderr)
        return 1


async def _apikey_run(args: argparse.Namespace) -> int:
    credentials = kube.Credentials.auto(args.kubeconfig)
    async with kube.Client(credentials, field_manager="opkeeper-apikey") as client:
        return await _APIKEY_ACTIONS[args.action](client, args)


async def _apikey_create(client: kube.Client, args: argparse.Namespace) -> int:
    key = await apikeys.create(
        client,
        key_namespace=args.key_namespace,
        tenant=args.namespace,
        user=args.user,
        system_namespace=args.system_namespace,
    )
    print(json.dumps(key.to_json(), indent=2) if args.output == "json" else key.text(url=args.url))
    return 0


async def _apikey_list(client: kube.Client, args: argparse.Namespace) -> int:
    keys = await apikeys.list_keys(client, key_namespace=args.key_namespace, tenant=args.namespace)
    if keys or args.output == "json":
        _print_keys(keys, output=args.output)
    else:
        which = f" for namespace {args.namespace}" if args.namespace else ""
        print(f"No API keys{which} in {args.key_namespace}.", file=sys.stderr)
    return 0


async def _apikey_revoke(client: kube.Client, args: argparse.Namespace) -> int:
    if args.name is not None:
        deleted = await apikeys.revoke(client, key_namespace=args.key_namespace, name=args.name)
        wanted = f"no API key named {args.name}"
    else:
        deleted = await apikeys.revoke_user(
            client, key_namespace=args.key_namespace, tenant=args.namespace, user=args.user
        )
        wanted = f"no API key of user {args.user} for namespace {args.namespace}"
    if not deleted:
        print(
            f"opkeeper apikey revoke: {wanted} in {args.key_namespace}; nothing revoked",
            file=sys.stderr,
        )
        return 2
    if args.output == "json":
        _print_keys(deleted, output=args.output)
    else:
        for k in deleted:
            print(f"revoked {k.name} (user {k.user_id}, namespace {k.namespace})")
    return 0


_APIKEY_ACTIONS: dict[
    str, Callable[[kube.Client, argparse.Namespace], Coroutine[Any, Any, int]]
] = {"create": _apikey_create, "list": _apikey_list, "revoke": _apikey_revoke}


def _print_keys(keys: Sequence[apikeys.ApiKey], *, output: str) -> None:
    print(
        json.dumps([k.to_json() for k in keys], indent=2)
        if output == "json"
        else apikeys.table(keys)
    )


COMMANDS["apikey"] = ("create, list and revoke the gateway's API keys", _apikey_parser, _apikey)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opkeeper", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_flags, _) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    raise SystemExit(main())
