"""The pure parts of the request layer: retry decisions, ExecCredential parsing, token files.

No API server here: :func:`opkeeper.kuberetry.decide` and
:func:`opkeeper.kubeauth.parse_exec_credential` are functions of their arguments,
and :class:`opkeeper.kubeauth.TokenFile` takes its clock as a parameter.
tests/test_kube_credentials.py runs the same code against the real API server.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import pathlib
import time

import pytest

from opkeeper import errors, kubeauth, kuberetry

POLICY = kuberetry.Policy(max_attempts=4, base_delay=0.5, max_delay=2.0, budget=5.0)
NOW = 1_700_000_000.0


def decide(
    failure: kuberetry.Failure,
    *,
    repeatable: bool = True,
    attempt: int = 1,
    waited: float = 0.0,
    jitter: float = 0.0,
) -> float | None:
    return kuberetry.decide(
        failure,
        repeatable=repeatable,
        attempt=attempt,
        waited=waited,
        policy=POLICY,
        jitter=jitter,
        now=NOW,
    )


def test_429_waits_as_told_for_any_request() -> None:
    throttled = kuberetry.Failure(status=429, retry_after="2")
    assert decide(throttled, repeatable=False) == 2.0
    # An HTTP date works as well as seconds.
    date = email.utils.formatdate(NOW + 3, usegmt=True)
    assert decide(kuberetry.Failure(status=429, retry_after=date)) == pytest.approx(3.0)
    # No (or a broken) Retry-After: the exponential backoff.
    assert decide(kuberetry.Failure(status=429)) == 0.5
    assert decide(kuberetry.Failure(status=429, retry_after="soon")) == 0.5


def test_the_budget_and_the_attempts_bound_every_call() -> None:
    # A Retry-After beyond the budget gives up at once rather than waiting in vain.
    assert decide(kuberetry.Failure(status=429, retry_after="60")) is None
    assert decide(kuberetry.Failure(status=429, retry_after="2"), waited=3.5) is None
    assert decide(kuberetry.Failure(status=503), attempt=POLICY.max_attempts) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    delays = [decide(kuberetry.Failure(status=503), attempt=n) for n in (1, 2, 3)]
    assert delays == [0.5, 1.0, 2.0]
    assert decide(kuberetry.Failure(status=503), attempt=3, jitter=0.75) == 0.5
    assert kuberetry.backoff(attempt=10, base=0.5, cap=2.0, jitter=0.0) == 2.0
    # Streams never give up: the delay grows to its cap, a Retry-After wins.
    assert kuberetry.stream_delay(failures=1, base=1.0, retry_after=None, jitter=0.0) == 1.0
    assert kuberetry.stream_delay(failures=20, base=1.0, retry_after=None, jitter=0.0) == 30.0
    assert kuberetry.stream_delay(failures=20, base=1.0, retry_after=None, jitter=0.99) > 15.0
    assert kuberetry.stream_delay(failures=3, base=1.0, retry_after=7.0, jitter=0.0) == 7.0


def test_what_may_have_acted_is_repeated_only_when_repeatable() -> None:
    refused = kuberetry.Failure(status=None, sent=False)
    lost = kuberetry.Failure(status=None, sent=True)
    for failure in (lost, kuberetry.Failure(status=500), kuberetry.Failure(status=503)):
        assert decide(failure, repeatable=True) == 0.5
        assert decide(failure, repeatable=False) is None
    # A connection never made: the server did nothing, so even a create is sent again.
    assert decide(refused, repeatable=False) == 0.5
    # 501 will not change; 4xx are answers, not failures.
    for status in (501, 400, 403, 404, 409, 422):
        assert decide(kuberetry.Failure(status=status)) is None


def test_which_requests_are_repeatable() -> None:
    assert kuberetry.repeatable(method="GET")
    assert kuberetry.repeatable(method="PUT")
    assert kuberetry.repeatable(method="DELETE")
    assert kuberetry.repeatable(method="PATCH", patch_type="merge")
    assert kuberetry.repeatable(method="PATCH", patch_type="apply")
    assert not kuberetry.repeatable(method="PATCH", patch_type="json")
    assert not kuberetry.repeatable(method="POST")


def credential(**status: object) -> bytes:
    document = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential"}
    return json.dumps({**document, "status": status}).encode()


def test_exec_credentials_parse_and_refuse_without_quoting_the_output() -> None:
    v1 = "client.authentication.k8s.io/v1"
    got = kubeauth.parse_exec_credential(
        credential(token="t0k", expirationTimestamp="2030-01-02T03:04:05Z"), api_version=v1
    )
    assert got.header == "Bearer t0k"
    assert got.expires == 1893553445.0
    cert = kubeauth.parse_exec_credential(
        credential(clientCertificateData="C", clientKeyData="K"), api_version=v1
    )
    assert (cert.header, cert.certificate, cert.expires) == (None, ("C", "K"), None)
    bad = [
        b"not json secret-token",
        json.dumps({"kind": "Other"}).encode(),
        credential(),
        credential(clientCertificateData="C"),
        credential(token="secret-token", expirationTimestamp="tomorrow"),
    ]
    for output in bad:
        with pytest.raises(errors.Unauthenticated) as caught:
            kubeauth.parse_exec_credential(output, api_version=v1)
        assert "secret-token" not in str(caught.value)
    with pytest.raises(errors.Unauthenticated, match="apiVersion"):
        kubeauth.parse_exec_credential(
            credential(token="x"), api_version="client.authentication.k8s.io/v1beta1"
        )


def test_an_exec_stanza_is_checked() -> None:
    config = kubeauth.ExecConfig.from_kubeconfig(
        {
            "command": "bin/plugin",
            "args": ["a"],
            "env": [{"name": "K", "value": "v"}],
            "apiVersion": "client.authentication.k8s.io/v1beta1",
        },
        base="/etc/kube",
    )
    assert config.command == "/etc/kube/bin/plugin"  # relative to the kubeconfig
    assert (config.args, config.env) == (("a",), (("K", "v"),))
    with pytest.raises(errors.InvalidArgument, match="apiVersion"):
        kubeauth.ExecConfig.from_kubeconfig(
            {"command": "x", "apiVersion": "client.authentication.k8s.io/v1alpha1"}, base=None
        )
    with pytest.raises(errors.InvalidArgument, match="command"):
        kubeauth.ExecConfig.from_kubeconfig({"apiVersion": "v1"}, base=None)


def test_a_token_file_is_read_again_each_interval_and_after_a_rejection(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    now = [0.0]
    tokens = kubeauth.TokenFile(path, interval=60.0, clock=lambda: now[0])

    async def scenario() -> None:
        assert await tokens.header() == "Bearer one"
        path.write_text("two")
        now[0] = 59.0
        assert await tokens.header() == "Bearer one"  # within the interval: cached
        now[0] = 60.0
        assert await tokens.header() == "Bearer two"
        path.write_text("three")
        await tokens.rejected("Bearer stale")  # someone else renewed already: no read
        assert await tokens.header() == "Bearer two"
        await tokens.rejected("Bearer two")
        assert await tokens.header() == "Bearer three"
        # A file missing for a moment (mid-rotation) keeps the last token.
        path.unlink()
        await tokens.rejected("Bearer three")
        assert await tokens.header() == "Bearer three"

    asyncio.run(scenario())
    with pytest.raises(errors.Unauthenticated, match="token file"):
        kubeauth.TokenFile(tmp_path / "absent").read()


def test_in_cluster_server_from_the_environment() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert kubeauth.in_cluster_server(env) == "https://10.0.0.1:443"
    env6 = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert kubeauth.in_cluster_server(env6) == "https://[fd00::1]:6443"
    assert kubeauth.in_cluster_server({}) is None


def test_kopf_logs_in_from_the_same_refreshing_source(tmp_path: pathlib.Path) -> None:
    """kopf (the Job watch) gets the token the source has now, and an expiration a
    re-read interval away, so it asks again in step with our own client."""
    from opkeeper import controller, kube

    path = tmp_path / "token"
    path.write_text("first")
    source = kubeauth.TokenFile(path)
    credentials = kube.Credentials(server="https://127.0.0.1:1", ssl_context=False, source=source)
    header = source.read()
    info = controller._refreshed_connection_info(credentials, source, header)
    assert (info.scheme, info.token) == ("Bearer", "first")
    assert info.expiration is not None
    assert 50 < info.expiration.timestamp() - time.time() <= 60
