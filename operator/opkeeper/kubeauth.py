"""Credentials that refresh: a service-account token file and kubeconfig exec plugins.

A pod's projected service-account token is rotated by the kubelet (about hourly,
valid for longer), and an exec plugin's token (cloud IAM, Vault, ...) expires;
reading either once at start ends, hours later, in a 401 on every call. A
:class:`TokenSource` hands :class:`opkeeper.kube.Client` the header to send now
and gets told when the API server rejected it: :class:`TokenFile` re-reads its
file every minute (as client-go does) and on a 401; :class:`ExecPlugin` re-runs
the plugin when its ``expirationTimestamp`` is near and on a 401. The client
retries a rejected call once with the fresh credential, so a persistent 401 is
an error, never a loop.

Tokens are never logged, and never put into an exception message.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from opkeeper import errors

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where the kubelet mounts a pod's service-account token and the cluster CA."""
TOKEN_REREAD_INTERVAL = 60.0
"""Seconds between re-reads of a token file (client-go: one minute)."""
EXEC_TIMEOUT = 30.0
"""Seconds an exec plugin may run before it counts as failed."""
EXEC_OUTPUT_MAX = 1 << 20
"""Largest ExecCredential (bytes) accepted from a plugin."""
EXPIRY_SKEW = 10.0
"""Seconds before a plugin credential's expirationTimestamp at which it is renewed."""
EXEC_API_VERSIONS = frozenset(
    {"client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"}
)
"""ExecCredential versions understood (v1alpha1 was removed from Kubernetes in 1.24)."""


class TokenSource(abc.ABC):
    """Where the ``Authorization`` header comes from when it can change."""

    generation: int = 0
    """Bumped when the client certificate changed: connections made before are stale."""

    @abc.abstractmethod
    async def header(self) -> str | None:
        """The ``Authorization`` value to send now (renewed first if stale); None: none."""

    @abc.abstractmethod
    async def rejected(self, header: str | None) -> None:
        """The API server answered 401 to ``header``: renew, unless already done since."""

    def describe(self) -> str:
        """Where credentials come from, for error messages (never the credential)."""
        return type(self).__name__

    def valid_until(self) -> float | None:
        """Epoch seconds until which the last header is worth using (None: unknown);
        kopf, which keeps its own copy, logs in again then."""
        return None

    def certificate(self) -> tuple[str, str] | None:
        """The PEM client certificate and key the source gave, if any."""
        return None


class TokenFile(TokenSource):
    """A bearer token in a file, re-read every ``interval`` seconds and on a 401."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = TOKEN_REREAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = pathlib.Path(path)
        self._interval = interval
        self._clock = clock
        self._value: str | None = None
        self._read_at = -math.inf
        self.reads = 0
        """How often the file was read (for tests)."""

    def describe(self) -> str:
        return f"the token file {self._path}"

    def _read(self) -> None:
        self._read_at = self._clock()
        try:
            token = self._path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        else:
            problem = "it is empty" if not token else ""
        self.reads += 1
        if problem:
            if self._value is None:
                raise errors.Unauthenticated(f"cannot read {self.describe()}: {problem}")
            # A rotation replaces the file; a moment without it keeps the last token.
            logger.warning("cannot read %s (%s); keeping the last token", self.describe(), problem)
            return
        self._value = f"Bearer {token}"

    def valid_until(self) -> float | None:
        return time.time() + self._interval

    def read(self) -> str:
        """Read the file now (synchronously) and return the header; for a login at start."""
        self._read()
        assert self._value is not None
        return self._value

    async def header(self) -> str | None:
        if self._clock() - self._read_at >= self._interval:
            self._read()
        return self._value

    async def rejected(self, header: str | None) -> None:
        if header == self._value:
            self._read()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecConfig:
    """A kubeconfig's ``users[].user.exec`` stanza."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables for the plugin (on top of ours)."""
    api_version: str = "client.authentication.k8s.io/v1"
    cwd: str | None = None
    """The kubeconfig's directory: a relative command path is resolved from there."""

    @classmethod
    def from_kubeconfig(cls, stanza: Mapping[str, Any], *, base: str | None) -> ExecConfig:
        """Parse the stanza; :class:`errors.InvalidArgument` if it is not one."""
        command = stanza.get("command")
        api_version = stanza.get("apiVersion", "")
        if not isinstance(command, str) or not command:
            raise errors.InvalidArgument("kubeconfig exec: command is missing")
        if api_version not in EXEC_API_VERSIONS:
            raise errors.InvalidArgument(
                f"kubeconfig exec: apiVersion {api_version!r} is not one of"
                f" {sorted(EXEC_API_VERSIONS)}"
            )
        args = stanza.get("args") or []
        env = stanza.get("env") or []
        if not all(isinstance(a, str) for a in args) or not all(
            isinstance(e, Mapping) and isinstance(e.get("name"), str) for e in env
        ):
            raise errors.InvalidArgument("kubeconfig exec: args must be strings, env name/value")
        if os.sep in command and not os.path.isabs(command) and base:
            command = os.path.join(base, command)
        return cls(
            command=command,
            args=tuple(args),
            env=tuple((e["name"], str(e.get("value", ""))) for e in env),
            api_version=api_version,
            cwd=base or None,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecResult:
    """What a plugin run gave: a header and/or a client certificate, until when."""

    header: str | None
    expires: float | None
    """Wall-clock (epoch) seconds of ``expirationTimestamp``; None: until rejected."""
    certificate: tuple[str, str] | None = None
    """PEM certificate and key, when the plugin authenticates by client certificate."""


def parse_exec_credential(output: bytes, *, api_version: str) -> ExecResult:
    """A plugin's stdout as an :class:`ExecResult` (pure; errors never quote the output)."""
    try:
        document = json.loads(output)
    except ValueError:
        raise errors.Unauthenticated("exec plugin: its output is not JSON") from None
    if not isinstance(document, dict) or document.get("kind") != "ExecCredential":
        raise errors.Unauthenticated("exec plugin: its output is not an ExecCredential")
    if document.get("apiVersion") != api_version:
        raise errors.Unauthenticated(
            f"exec plugin: answered apiVersion {document.get('apiVersion')!r},"
            f" the kubeconfig asks for {api_version!r}"
        )
    status = document.get("status")
    if not isinstance(status, dict):
        raise errors.Unauthenticated("exec plugin: the ExecCredential has no status")
    token = status.get("token")
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if bool(cert) != bool(key):
        raise errors.Unauthenticated("exec plugin: a client certificate needs both cert and key")
    if not token and not cert:
        raise errors.Unauthenticated("exec plugin: the status has neither token nor certificate")
    expires: float | None = None
    stamp = status.get("expirationTimestamp")
    if stamp:
        try:
            moment = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            raise errors.Unauthenticated(
                f"exec plugin: expirationTimestamp {str(stamp)[:40]!r} is not RFC 3339"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        expires = moment.timestamp()
    return ExecResult(
        header=f"Bearer {token}" if token else None,
        expires=expires,
        certificate=(str(cert), str(key)) if cert else None,
    )


class ExecPlugin(TokenSource):
    """A kubeconfig exec plugin, run again when its credential nears expiry or gets a 401."""

    def __init__(
        self,
        config: ExecConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = EXEC_TIMEOUT,
        skew: float = EXPIRY_SKEW,
    ) -> None:
        self._config = config
        self._ssl_context = ssl_context
        self._clock = clock
        self._timeout = timeout
        self._skew = skew
        self._current: ExecResult | None = None
        self._certificate: tuple[str, str] | None = None
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self.runs = 0
        """How often the plugin ran (for tests)."""

    def describe(self) -> str:
        return f"the exec plugin {os.path.basename(self._config.command)}"

    def valid_until(self) -> float | None:
        return None if self._current is None else self._current.expires

    def certificate(self) -> tuple[str, str] | None:
        return self._certificate

    def _lock(self) -> asyncio.Lock:
        # One run at a time per loop (a lock belongs to the loop that first waits on it).
        return self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())

    def _stale(self) -> bool:
        current = self._current
        return current is None or (
            current.expires is not None and self._clock() >= current.expires - self._skew
        )

    async def header(self) -> str | None:
        if self._stale():
            async with self._lock():
                if self._stale():
                    await self._renew()
        assert self._current is not None
        return self._current.header

    async def rejected(self, header: str | None) -> None:
        async with self._lock():
            if self._current is None or self._current.header == header:
                await self._renew()

    async def _renew(self) -> None:
        self._current = await self._run()
        if self._current.certificate and self._current.certificate != self._certificate:
            self._load_certificate(self._current.certificate)

    def _environment(self) -> dict[str, str]:
        info = {
            "apiVersion": self._config.api_version,
            "kind": "ExecCredential",
            "spec": {"interactive": False},
        }
        return {
            **os.environ,
            **dict(self._config.env),
            "KUBERNETES_EXEC_INFO": json.dumps(info),
        }

    async def _run(self) -> ExecResult:
        self.runs += 1
        try:
            process = await asyncio.create_subprocess_exec(
                self._config.command,
                *self._config.args,
                env=self._environment(),
                cwd=self._config.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=EXEC_OUTPUT_MAX,
            )
        except OSError as exc:
            raise errors.Unauthenticated(
                f"{self.describe()} could not start: {exc.strerror or exc!r}"
            ) from None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise errors.Unauthenticated(
                f"{self.describe()} did not answer within {self._timeout:.0f}s"
            ) from None
        if process.returncode != 0:
            # stderr is the plugin's diagnostics (stdout would hold the credential).
            tail = stderr.decode(errors="replace").strip()[-300:]
            raise errors.Unauthenticated(
                f"{self.describe()} exited with code {process.returncode}: {tail}"
            )
        if len(stdout) > EXEC_OUTPUT_MAX:
            raise errors.Unauthenticated(f"{self.describe()}: its output is too large")
        return parse_exec_credential(stdout, api_version=self._config.api_version)

    def _load_certificate(self, certificate: tuple[str, str]) -> None:
        if self._ssl_context is None:
            raise errors.Unauthenticated(
                f"{self.describe()} gave a client certificate for a plain-HTTP server"
            )
        # The ssl module loads a chain from files only: private ones, removed at once.
        with tempfile.TemporaryDirectory(prefix="opkeeper-exec-") as directory:
            cert_path = pathlib.Path(directory, "cert.pem")
            key_path = pathlib.Path(directory, "key.pem")
            for path, data in ((cert_path, certificate[0]), (key_path, certificate[1])):
                path.touch(mode=0o600)
                path.write_text(_pem(data))
            self._ssl_context.load_cert_chain(cert_path, key_path)
        self._certificate = certificate
        self.generation += 1


def _pem(data: str) -> str:
    """PEM text; ExecCredential carries PEM, but tolerate base64 of PEM as some plugins send."""
    if "-----BEGIN" in data:
        return data
    try:
        return base64.b64decode(data, validate=True).decode()
    except ValueError:
        return data


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server URL from the pod's environment; None outside a pod."""
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"https://{host}:{port}"
