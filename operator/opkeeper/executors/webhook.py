"""An external system called over HTTP; waiting on it is waiting on them (EXT).

Start: POST the operation (JSON) to ``url`` with an ``Idempotency-Key`` that
is the same for every try of one attempt and different for the next
attempt, so the receiver can make our retries — including the one after a
controller crash between the POST and recording its acceptance — a no-op.

Results: the external system either writes ``result`` / ``errorCode`` into
the status (directly or through the gateway's callback), or is polled at
``pollUrl`` with exponential backoff. The reply to a start or a poll is JSON
``{"id": ..., "state": "accepted|running|succeeded|failed", "progress": n,
"result": {"type": ..., "value": ...}, "error": {"code": n, "info": [...]}}``;
every key is optional. ``pollUrl`` and ``cancelUrl`` may contain ``{id}``
(the external id) and ``{key}`` (the idempotency key).

A 4xx reply to the start is a refusal (FailedExternal); 5xx, timeouts and
refused connections are retried with backoff until the deadline.

Whoever may create an Operation chooses the URLs, so the executor must not
become a way into what only the controller can reach (server-side request
forgery). Every connection goes through a :class:`Policy`, checked on the
addresses actually connected to (after DNS, so a name that resolves
elsewhere at connect time than at any earlier check is still caught);
redirects are never followed; a reply is read up to :data:`MAX_REPLY_BYTES`
and at most :data:`MAX_COPIED_CHARS` of it reach the status. A 2xx reply that
is not a JSON object of the shape above ends the attempt (WebhookBadReply)
rather than being retried. A poll that ends the attempt that way (a bad reply,
a redirect, a refused destination) first calls ``cancelUrl``: the external
system has accepted work that nobody will follow any more.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import math
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import aiohttp.abc
import aiohttp.resolver
import pydantic
import yarl

from opkeeper import models, states
from opkeeper.executors import base

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10

MAX_REPLY_BYTES = 64 * 1024
"""The most of a reply that is read; a longer reply is a bad reply, and is not read on."""
MAX_COPIED_CHARS = 256
"""The most characters of a reply copied into one status field (message, an errorInfo item)."""

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DENIED: tuple[tuple[Network, str], ...] = (
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    # All of 0.0.0.0/8, not only 0.0.0.0: Linux connects 0.0.0.0 to the host itself.
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified"),
    (ipaddress.ip_network("::/128"), "unspecified"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
    (ipaddress.ip_network("ff00::/8"), "multicast"),
)
"""Refused unless an allow-list CIDR covers the address: the controller's own host
(loopback), cloud metadata services (169.254.169.254), and addresses that are no
single destination."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """Where the webhook executor may connect (docs/controller.md, "Webhook destinations")."""

    allow_networks: tuple[Network, ...] = ()
    """Allowed address ranges. An address inside one is allowed even when loopback or
    link-local: tests and sidecars on the controller's own host need that."""
    allow_hosts: frozenset[str] = frozenset()
    """Allowed host names (lower case, no trailing dot), as written in the URL."""
    api_servers: frozenset[tuple[str, int]] = frozenset()
    """The cluster's API server as (address or host name, port): refused always, even
    when allow-listed, because the reply of the API server is not the tenant's to read."""

    @property
    def restricted(self) -> bool:
        """An allow-list is set: only what it names is allowed."""
        return bool(self.allow_networks or self.allow_hosts)

    @classmethod
    def build(cls, *, allow: Iterable[str], api_server: str, environ: Mapping[str, str]) -> Policy:
        """The policy for allow-list entries (see :func:`allow_entry`) and a controller
        whose credentials point at the URL ``api_server``; in a pod, ``environ`` also
        names the API server's service (KUBERNETES_SERVICE_HOST and _PORT)."""
        networks: list[Network] = []
        hosts: set[str] = set()
        for value in allow:
            entry = allow_entry(value)
            if isinstance(entry, str):
                hosts.add(entry)
            else:
                networks.append(entry)
        endpoints: set[tuple[str, int]] = set()
        url = yarl.URL(api_server)
        if url.raw_host is not None and url.port is not None:
            endpoints.add((_host_key(url.raw_host), url.port))
        service_host = environ.get("KUBERNETES_SERVICE_HOST")
        service_port = environ.get("KUBERNETES_SERVICE_PORT", "")
        if service_host and service_port.isdigit():
            endpoints.add((_host_key(service_host), int(service_port)))
        return cls(
            allow_networks=tuple(networks),
            allow_hosts=frozenset(hosts),
            api_servers=frozenset(endpoints),
        )


def allow_entry(value: str) -> Network | str:
    """One allow-list entry: an address range (``10.0.0.0/8``, ``127.0.0.1/32``; a bare
    address is a /32 or /128) or a host name. Raises ValueError for anything else."""
    text = value.strip()
    if _looks_numeric(text) or "/" in text:
        try:
            # strict: "10.1.2.3/8" is a typo for something, not a wish for all of 10/8.
            return ipaddress.ip_network(text)
        except ValueError as exc:
            raise ValueError(f"{value!r} is neither a CIDR nor a host name: {exc}") from exc
    name = _host_key(text)
    # No wildcards: "*.example.com" would silently match nothing.
    if not name or any(ch.isspace() or ch in "*@?#[]%" for ch in name):
        raise ValueError(f"{value!r} is neither a CIDR nor a host name")
    return name


def refusal(policy: Policy, *, host: str, address: str, port: int) -> str | None:
    """Why connecting to ``address``:``port``, found for the URL host ``host``, is refused
    under ``policy``; None when it is allowed. No I/O: both the resolver and the check of
    literal-address URLs ask this, and the tests ask it directly.

    In order: the API server's endpoint is refused always; an allow-list CIDR covering
    the address allows it; the built-in denials (:data:`_DENIED`) refuse; with an
    allow-list, the host name must be on it; without one, everything else is allowed.
    """
    ip = _address(address)
    name = _host_key(host)
    if (str(ip), port) in policy.api_servers or (name, port) in policy.api_servers:
        return "it is the cluster's API server"
    if any(ip in network for network in policy.allow_networks):
        return None
    for network, kind in _DENIED:
        if ip in network:
            return f"{ip} is a {kind} address"
    if policy.restricted and name not in policy.allow_hosts:
        return f"{ip} is not in the webhook allow-list"
    return None


class DestinationRefused(OSError):
    """A destination the policy refuses. An OSError because the resolver raises it:
    aiohttp then wraps it in ClientConnectorError as it does a failed DNS lookup."""

    def __init__(self, *, host: str, why: str) -> None:
        super().__init__(f"webhook destination {host} is not allowed: {why}")


class PolicyResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's default resolver, refusing a host name when any address it resolves to
    is refused. aiohttp asks it for every new connection to a name, so the check is on
    the addresses connected to, not on an earlier answer (DNS rebinding)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._inner = aiohttp.resolver.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        policy = await self._with_api_server_addresses(port)
        for result in found:
            why = refusal(policy, host=host, address=result["host"], port=port)
            if why is not None:
                raise DestinationRefused(host=host, why=why)
        return found

    async def _with_api_server_addresses(self, port: int) -> Policy:
        """The policy, with the addresses of an API server named by host name on ``port``
        (a kubeconfig naming a load balancer): its address must be refused too."""
        names = [
            host for host, p in self._policy.api_servers if p == port and not _is_address(host)
        ]
        extra: set[tuple[str, int]] = set()
        for name in names:
            try:
                answers = await self._inner.resolve(name, port, socket.AF_UNSPEC)
            except OSError:
                continue  # unresolvable now: then no connection can reach it through that name
            extra.update((str(_address(answer["host"])), port) for answer in answers)
        if not extra:
            return self._policy
        return dataclasses.replace(self._policy, api_servers=self._policy.api_servers | extra)

    async def close(self) -> None:
        await self._inner.close()


class _BadReply(Exception):
    """A 2xx reply that is not a JSON object of the documented shape."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Reply:
    status: int
    body: bytes
    """At most MAX_REPLY_BYTES + 1 bytes: one more than allowed marks a reply too long."""

    @property
    def too_long(self) -> bool:
        return len(self.body) > MAX_REPLY_BYTES

    def excerpt(self) -> str:
        """What of the reply may be copied into the status."""
        # A UTF-8 character is at most 4 bytes: decode no more than the excerpt can use.
        text = self.body[: 4 * MAX_COPIED_CHARS].decode("utf-8", errors="replace")
        return text[:MAX_COPIED_CHARS]


@dataclasses.dataclass
class _Backoff:
    next_at: datetime.datetime
    delay: float


class WebhookExecutor:
    """Calls the webhook once per attempt, then waits for a callback or polls."""

    def __init__(
        self, *, policy: Policy, initial_delay: float = 1.0, max_delay: float = 60.0
    ) -> None:
        self._policy = policy
        self._initial = initial_delay
        self._max = max_delay
        self._session: aiohttp.ClientSession | None = None
        self._backoff: dict[str, _Backoff] = {}
        """Per attempt key: when to retry the start or poll next (restarts begin afresh)."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env stays False (the default): through an HTTP proxy the resolver
            # would check the proxy's address, not the destination's.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=PolicyResolver(self._policy)),
                # A compressed reply could expand far beyond the cap before a byte of it
                # is read: ask for none, and leave one sent anyway undecoded (a bad reply).
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _spec(self, ctx: base.Context) -> models.WebhookExecutor:
        spec = ctx.op.spec.executor.webhook
        assert spec is not None
        return spec

    def _timeout(self, ctx: base.Context) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self._spec(ctx).timeout_seconds or DEFAULT_TIMEOUT_SECONDS
        )

    def _delay(self, key: str, now: datetime.datetime) -> datetime.datetime:
        """The next try after a failed or inconclusive one: 1 s, 2 s, 4 s ... capped."""
        previous = self._backoff.get(key)
        delay = self._initial if previous is None else min(previous.delay * 2, self._max)
        wake = now + datetime.timedelta(seconds=delay)
        self._backoff[key] = _Backoff(next_at=wake, delay=delay)
        return wake

    async def _call(
        self, method: str, url: str, *, ctx: base.Context, payload: dict[str, Any] | None
    ) -> _Reply:
        """One request under the policy: no redirects, the reply read up to the cap.

        Raises DestinationRefused for a refused destination, aiohttp.ClientError or
        TimeoutError for a failed call.
        """
        self._check_literal(url)
        try:
            async with self.session.request(
                method,
                url,
                json=payload,
                headers={"Idempotency-Key": ctx.key},
                timeout=self._timeout(ctx),
                allow_redirects=False,
            ) as response:
                return _Reply(status=response.status, body=await _read_capped(response.content))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationRefused):
                raise exc.os_error from None
            raise
        except aiohttp.InvalidURL as exc:
            # A URL aiohttp cannot connect to at all (no host): retrying cannot help.
            raise DestinationRefused(host=str(exc.url), why="not a valid URL host") from None

    def _check_literal(self, url: str) -> None:
        """aiohttp connects to a literal address without asking the resolver: check it here."""
        parsed = yarl.URL(url)
        host, port = parsed.raw_host, parsed.port
        if host is None or port is None or not _looks_numeric(host):
            return  # no host: aiohttp refuses the URL; a name: the resolver checks it
        if not _is_address(host):
            # aiohttp treats it as an address too; old versions let the OS read it in
            # a legacy form (127.1, 2130706433) this check cannot follow.
            raise DestinationRefused(host=host, why="not a canonical address")
        why = refusal(self._policy, host=host, address=host, port=port)
        if why is not None:
            raise DestinationRefused(host=host, why=why)

    async def start(self, ctx: base.Context) -> base.Outcome:
        spec = self._spec(ctx)
        record = models.ExecutorStatus(
            kind="webhook", idempotency_key=ctx.key, params=ctx.op.spec.params
        )
        try:
            reply = await self._call("POST", spec.url, ctx=ctx, payload=ctx.describe())
        except DestinationRefused as exc:
            self._backoff.pop(ctx.key, None)
            return dataclasses.replace(_not_allowed(exc), executor=record)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return base.NotStarted(wake_at=self._delay(ctx.key, ctx.now), message=repr(exc))
        status = reply.status
        if status >= 500 or status in (408, 429):
            return base.NotStarted(
                wake_at=self._delay(ctx.key, ctx.now), message=f"HTTP {status}: {reply.excerpt()}"
            )
        self._backoff.pop(ctx.key, None)
        if status >= 400:
            return base.Finished(
                event=states.Event.FAIL_EXTERNAL,
                reason="WebhookRejected",
                message=f"{spec.url} answered HTTP {status}: {reply.excerpt()}",
                error_code=status,
                error_info=[reply.excerpt()],
                executor=record,
            )
        if status >= 300:
            return dataclasses.replace(_redirect(spec.url, status), executor=record)
        try:
            data = _object(reply)
            outcome = self._interpret(data)
        except _BadReply as exc:
            return dataclasses.replace(_bad_reply(spec.url, reply, exc), executor=record)
        record = record.model_copy(
            update={"external_id": _str(data.get("id")), "accepted_at": ctx.now}
        )
        if outcome is not None:
            return dataclasses.replace(outcome, executor=record)
        return base.Running(
            executor=record,
            waiting_external=True,
            progress=_progress(data),
            wake_at=self._delay(ctx.key, ctx.now) if spec.poll_url else None,
        )

    async def poll(self, ctx: base.Context) -> base.Outcome:
        reported = base.reported(ctx, failure=states.Event.FAIL_EXTERNAL)
        if reported is not None:
            return reported
        spec = self._spec(ctx)
        if spec.poll_url is None:
            return base.Running()
        backoff = self._backoff.get(ctx.key)
        if backoff is not None and ctx.now < backoff.next_at:
            return base.Running(wake_at=backoff.next_at)
        url = self._fill(spec.poll_url, ctx)
        try:
            reply = await self._call("GET", url, ctx=ctx, payload=None)
        except DestinationRefused as exc:
            return await self._abandon(ctx, _not_allowed(exc))
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info("poll of %s failed: %r", url, exc)
            return base.Running(wake_at=self._delay(ctx.key, ctx.now))
        if reply.status >= 400:
            logger.info("poll of %s answered HTTP %d", url, reply.status)
            return base.Running(wake_at=self._delay(ctx.key, ctx.now))
        if reply.status >= 300:
            return await self._abandon(ctx, _redirect(url, reply.status))
        try:
            data = _object(reply)
            outcome = self._interpret(data)
        except _BadReply as exc:
            return await self._abandon(ctx, _bad_reply(url, reply, exc))
        if outcome is not None:
            self._backoff.pop(ctx.key, None)
            return outcome
        return base.Running(progress=_progress(data), wake_at=self._delay(ctx.key, ctx.now))

    async def _abandon(self, ctx: base.Context, outcome: base.Finished) -> base.Finished:
        """End an accepted attempt on our side (a poll we refuse or cannot read), first
        asking the external system to stop it, so nothing runs on that nobody follows."""
        await self.cancel(ctx)
        return outcome

    async def cancel(self, ctx: base.Context) -> None:
        spec = self._spec(ctx)
        self._backoff.pop(ctx.key, None)
        if spec.cancel_url is None:
            return
        url = self._fill(spec.cancel_url, ctx)
        try:
            reply = await self._call("POST", url, ctx=ctx, payload=ctx.describe())
        except (aiohttp.ClientError, TimeoutError, DestinationRefused) as exc:
            # The operation is cancelled on our side either way; the log says theirs may run on.
            logger.warning("cancel at %s failed: %s", url, exc)
            return
        if reply.status >= 300:
            logger.warning("cancel at %s answered HTTP %d", url, reply.status)

    def forget(self, uid: str) -> None:
        for key in [k for k in self._backoff if k.startswith(f"{uid}-")]:
            del self._backoff[key]

    @staticmethod
    def _fill(template: str, ctx: base.Context) -> str:
        record = ctx.op.status.executor
        external = record.external_id if record and record.external_id else ""
        # The id comes from the external system's reply: quoted, it can fill one path
        # segment or query value but never add a segment, a query or a host.
        return template.replace("{id}", urllib.parse.quote(external, safe="")).replace(
            "{key}", urllib.parse.quote(ctx.key, safe="")
        )

    @staticmethod
    def _interpret(reply: dict[str, Any]) -> base.Finished | None:
        """The end the reply reports, if any. Raises _BadReply for a malformed one: it
        would fail the status write or the reconcile on every retry."""
        state = str(reply.get("state", "")).lower()
        if state == "succeeded":
            result = reply.get("result")
            try:
                parsed = models.Result.model_validate(result) if result is not None else None
            except pydantic.ValidationError:
                raise _BadReply("a result that is not {type, value}") from None
            return base.Finished(
                event=states.Event.SUCCEED, reason="ExternalSucceeded", result=parsed
            )
        if state == "failed":
            error = reply.get("error")
            error = error if isinstance(error, dict) else {}
            info = error.get("info") or []
            if not isinstance(info, list):
                raise _BadReply("an error.info that is not a list")
            lines = [str(line)[:MAX_COPIED_CHARS] for line in info][:16]
            try:
                code = int(error.get("code") or 1)
            except (TypeError, ValueError, OverflowError):
                raise _BadReply("an error.code that is not an integer") from None
            if not -(2**63) <= code < 2**63:  # the API server stores errorCode as an int64
                raise _BadReply("an error.code beyond 64 bits")
            return base.Finished(
                event=states.Event.FAIL_EXTERNAL,
                reason="ExternalFailed",
                message=lines[0] if lines else "the external system reported a failure",
                error_code=code,
                error_info=lines,
            )
        return None


async def _read_capped(content: aiohttp.StreamReader) -> bytes:
    """Up to MAX_REPLY_BYTES + 1 bytes of a body, never more: the extra byte tells a
    reply that is too long from one that is exactly at the cap."""
    body = bytearray()
    while len(body) <= MAX_REPLY_BYTES:
        chunk = await content.read(MAX_REPLY_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _object(reply: _Reply) -> dict[str, Any]:
    """The JSON object of a 2xx reply ({} for an empty one); _BadReply for anything else."""
    if reply.too_long:
        raise _BadReply(f"a reply longer than {MAX_REPLY_BYTES} bytes")
    if not reply.body.strip():
        return {}
    try:
        value = json.loads(reply.body)
    except ValueError:
        raise _BadReply("a reply that is not JSON") from None
    if not isinstance(value, dict):
        raise _BadReply("JSON that is not an object")
    return value


def _not_allowed(exc: DestinationRefused) -> base.Finished:
    # Our policy's refusal, not the external system's failure: hence FailedInternal.
    return base.Finished(
        event=states.Event.FAIL_INTERNAL, reason="WebhookNotAllowed", message=str(exc)
    )


def _redirect(url: str, status: int) -> base.Finished:
    return base.Finished(
        event=states.Event.FAIL_EXTERNAL,
        reason="WebhookRedirect",
        message=f"{url} answered HTTP {status}, a redirect; redirects are not followed",
        error_code=status,
    )


def _bad_reply(url: str, reply: _Reply, exc: _BadReply) -> base.Finished:
    excerpt = reply.excerpt()
    return base.Finished(
        event=states.Event.FAIL_EXTERNAL,
        reason="WebhookBadReply",
        message=f"{url} answered HTTP {reply.status} with {exc}",
        error_info=[excerpt] if excerpt else None,
    )


def _looks_numeric(host: str) -> bool:
    """What aiohttp takes for an address rather than a name (and so never resolves)."""
    return ":" in host or host.replace(".", "").isdigit()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(text: str) -> Address:
    """An address as the kernel will treat it: an IPv4-mapped IPv6 address (::ffff:a.b.c.d)
    is the IPv4 address, and a zone (fe80::1%eth0) does not change which address it is."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ipaddress.IPv6Address(int(ip))
    return ip


def _host_key(host: str) -> str:
    """A host as the policy compares it: an address in its canonical text, a name in
    lower case without the trailing dot of a fully qualified name."""
    text = host.strip()
    return str(_address(text)) if _is_address(text) else text.lower().rstrip(".")


def _str(value: object) -> str | None:
    return None if value is None else str(value)[:MAX_COPIED_CHARS]


def _progress(reply: dict[str, Any]) -> int | None:
    value = reply.get("progress")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return max(0, min(100, int(value)))
