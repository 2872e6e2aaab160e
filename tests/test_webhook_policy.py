"""The webhook destination policy: the pure decision, its parsing, and the resolver."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import pytest

from opkeeper import models
from opkeeper.executors import base, webhook

API = ("10.96.0.1", 443)
DEFAULT = webhook.Policy(api_servers=frozenset({API}))
"""No allow-list: the built-in denials only (and an in-cluster API server)."""
LOOPBACK = webhook.Policy(
    allow_networks=(ipaddress.ip_network("127.0.0.1/32"),),
    api_servers=frozenset({("127.0.0.1", 6443)}),
)
"""What the tests' controllers run with: the API server itself is on loopback too."""
NAMED = webhook.Policy(
    allow_hosts=frozenset({"adapter.opkeeper-system.svc"}),
    allow_networks=(ipaddress.ip_network("10.20.0.0/16"),),
    api_servers=frozenset({("api.example.com", 443)}),
)


@pytest.mark.parametrize(
    ("policy", "host", "address", "port", "refused"),
    [
        # The built-in denials, by default.
        (DEFAULT, "127.0.0.1", "127.0.0.1", 80, "loopback"),
        (DEFAULT, "127.1.2.3", "127.1.2.3", 80, "loopback"),
        (DEFAULT, "localhost", "::1", 80, "loopback"),
        (DEFAULT, "::ffff:127.0.0.1", "::ffff:127.0.0.1", 80, "loopback"),
        (DEFAULT, "metadata.google.internal", "169.254.169.254", 80, "link-local"),
        (DEFAULT, "fe80::1", "fe80::1", 80, "link-local"),
        (DEFAULT, "fe80::1%eth0", "fe80::1%eth0", 80, "link-local"),
        (DEFAULT, "0.0.0.0", "0.0.0.0", 80, "unspecified"),
        (DEFAULT, "::", "::", 80, "unspecified"),
        (DEFAULT, "224.0.0.1", "224.0.0.1", 80, "multicast"),
        (DEFAULT, "ff02::1", "ff02::1", 80, "multicast"),
        # The API server: its address and port, however written; another port is not it.
        (DEFAULT, "10.96.0.1", "10.96.0.1", 443, "API server"),
        (DEFAULT, "kubernetes.default.svc", "10.96.0.1", 443, "API server"),
        (DEFAULT, "::ffff:10.96.0.1", "::ffff:10.96.0.1", 443, "API server"),
        (DEFAULT, "10.96.0.1", "10.96.0.1", 8080, None),
        # Everything else is allowed without an allow-list (cluster services included).
        (DEFAULT, "adapter.opkeeper-system.svc", "10.20.3.4", 8080, None),
        (DEFAULT, "example.com", "93.184.215.14", 443, None),
        (DEFAULT, "2001:db8::1", "2001:db8::1", 443, None),
        # An allow-listed CIDR overrides loopback, but not for the API server's endpoint.
        (LOOPBACK, "127.0.0.1", "127.0.0.1", 8080, None),
        (LOOPBACK, "::ffff:127.0.0.1", "::ffff:127.0.0.1", 8080, None),
        (LOOPBACK, "127.0.0.1", "127.0.0.1", 6443, "API server"),
        (LOOPBACK, "localhost", "127.0.0.1", 6443, "API server"),
        (LOOPBACK, "127.0.0.2", "127.0.0.2", 8080, "loopback"),
        (LOOPBACK, "localhost", "::1", 8080, "loopback"),
        # With an allow-list, only what it names: a host name, or addresses in a CIDR.
        (LOOPBACK, "example.com", "93.184.215.14", 443, "not in the webhook allow-list"),
        (NAMED, "adapter.opkeeper-system.svc", "10.30.0.7", 8080, None),
        (NAMED, "Adapter.Opkeeper-System.SVC.", "10.30.0.7", 8080, None),
        (NAMED, "other.opkeeper-system.svc", "10.20.9.9", 8080, None),
        (NAMED, "other.opkeeper-system.svc", "10.30.0.7", 8080, "not in the webhook allow-list"),
        (NAMED, "example.com", "93.184.215.14", 443, "not in the webhook allow-list"),
        # A listed name does not lift the built-in denials (its DNS may be rebound).
        (NAMED, "adapter.opkeeper-system.svc", "127.0.0.1", 8080, "loopback"),
        (NAMED, "adapter.opkeeper-system.svc", "169.254.169.254", 80, "link-local"),
        # An API server named by host name is refused by that name too.
        (NAMED, "API.example.com.", "10.20.0.1", 443, "API server"),
    ],
)
def test_refusal(
    policy: webhook.Policy, host: str, address: str, port: int, refused: str | None
) -> None:
    why = webhook.refusal(policy, host=host, address=address, port=port)
    if refused is None:
        assert why is None
    else:
        assert why is not None
        assert refused in why


def test_the_policy_names_the_api_server_of_the_credentials_and_of_the_pod() -> None:
    policy = webhook.Policy.build(
        allow=["127.0.0.1/32", "Adapter.Example.", "::1"],
        api_server="https://127.0.0.1:6443",
        environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    )
    assert policy.api_servers == {("127.0.0.1", 6443), ("10.96.0.1", 443)}
    assert policy.allow_hosts == {"adapter.example"}
    assert policy.allow_networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    named = webhook.Policy.build(allow=[], api_server="https://Kube.Example.com", environ={})
    assert named.api_servers == {("kube.example.com", 443)}
    assert not named.restricted
    v6 = webhook.Policy.build(allow=[], api_server="https://[::1]:6443", environ={})
    assert v6.api_servers == {("::1", 6443)}


@pytest.mark.parametrize(
    "value", ["10.1.2.3/8", "127.1", "2130706433", "*.example.com", "", "a b", "http://x/"]
)
def test_bad_allow_entries_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        webhook.allow_entry(value)


def test_the_resolver_refuses_a_name_that_resolves_to_a_refused_address() -> None:
    """Through aiohttp's own resolver: localhost is in /etc/hosts, no DNS needed."""

    async def resolve(policy: webhook.Policy, port: int) -> list[str]:
        resolver = webhook.PolicyResolver(policy)
        try:
            return [r["host"] for r in await resolver.resolve("localhost", port)]
        finally:
            await resolver.close()

    with pytest.raises(webhook.DestinationRefused, match=r"localhost is not allowed.*loopback"):
        asyncio.run(resolve(DEFAULT, 8080))
    assert asyncio.run(resolve(LOOPBACK, 8080)) == ["127.0.0.1"]
    with pytest.raises(webhook.DestinationRefused, match="API server"):
        asyncio.run(resolve(LOOPBACK, 6443))


def test_an_external_id_fills_one_segment_and_never_more() -> None:
    """The id comes from the external system's reply; quoted, it cannot add a segment,
    a query, a fragment or a userinfo@host part to pollUrl or cancelUrl."""
    op = models.Operation.model_validate(
        {
            "metadata": {"name": "o", "namespace": "n", "uid": "u"},
            "spec": {"type": "t", "executor": {"webhook": {"url": "http://ext.example/s"}}},
            "status": {"executor": {"kind": "webhook", "externalId": "../../x?y=1#z@evil/"}},
        }
    )
    ctx = base.Context(
        op=op,
        body={"metadata": {"name": "o", "namespace": "n", "uid": "u"}},
        id=1,
        attempt=1,
        now=datetime.datetime.now(datetime.UTC),
    )
    url = webhook.WebhookExecutor._fill("http://ext.example/poll/{id}?k={key}", ctx)
    assert url == "http://ext.example/poll/..%2F..%2Fx%3Fy%3D1%23z%40evil%2F?k=u-1"
