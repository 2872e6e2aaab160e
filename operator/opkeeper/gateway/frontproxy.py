"""Who is calling through the Kubernetes aggregation layer: the front proxy's word, checked.

kube-apiserver authenticates the caller, then proxies the request to an
aggregated API server with the caller's name, groups and extra attributes in
request headers (``X-Remote-User``, ``X-Remote-Group``, ``X-Remote-Extra-*``)
over a TLS connection on which it presents its proxy client certificate.
Anyone could send such headers, so they are believed only on a connection
whose client certificate chains to the request-header CA that kube-apiserver
publishes in ConfigMap ``kube-system/extension-apiserver-authentication``
(``requestheader-client-ca-file``) and whose common name is one of
``requestheader-allowed-names`` (an empty list allows any name that CA
signed). The header names themselves come from the same ConfigMap.

The ConfigMap is watched (:class:`TrustStore` is a :class:`kubeio.Fed`), and
every new TLS handshake uses the CA bundle as it is at that moment: the
listening :class:`ssl.SSLContext` hands each handshake to the context built
from the current bundle (``sni_callback``, which runs on every ClientHello,
with or without a server name). So a rotated CA is trusted without a restart.
Connections made before a rotation keep the trust they were made with, as
kube-apiserver's own do.

Parsing the ConfigMap and the headers are pure functions (:func:`trust_from`,
:func:`user_from`, :func:`name_allowed`); only :class:`TrustStore` holds state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDictProxy

log = logging.getLogger(__name__)

CONFIGMAP_NAMESPACE = "kube-system"
"""Where kube-apiserver publishes its front-proxy trust."""
CONFIGMAP_NAME = "extension-apiserver-authentication"
"""The ConfigMap kube-apiserver keeps current with its request-header settings."""

DEFAULT_USERNAME_HEADERS = ("X-Remote-User",)
DEFAULT_GROUP_HEADERS = ("X-Remote-Group",)
DEFAULT_EXTRA_PREFIXES = ("X-Remote-Extra-",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trust:
    """The request-header settings of one version of the ConfigMap."""

    ca_pem: str
    """The CA bundle (PEM) a front proxy's client certificate must chain to."""
    allowed_names: frozenset[str]
    """Common names a front proxy's certificate may have; empty allows any."""
    username_headers: tuple[str, ...] = DEFAULT_USERNAME_HEADERS
    group_headers: tuple[str, ...] = DEFAULT_GROUP_HEADERS
    extra_prefixes: tuple[str, ...] = DEFAULT_EXTRA_PREFIXES
    uid_headers: tuple[str, ...] = ()
    """Where the user's UID comes (``requestheader-uid-headers``, published only when
    kube-apiserver's RemoteRequestHeaderUID feature is on)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class User:
    """A Kubernetes user as the front proxy named it (what a SubjectAccessReview takes)."""

    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Extra attributes, sorted by key (hashable: it is part of a cache key)."""

    def extra_dict(self) -> dict[str, list[str]]:
        return {key: list(values) for key, values in self.extra}


def _string_list(raw: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    """A JSON list of strings from the ConfigMap (kube-apiserver writes them so)."""
    if not isinstance(raw, str) or not raw.strip():
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return default
    return tuple(value)


def trust_from(data: Mapping[str, Any]) -> Trust | None:
    """The trust a ConfigMap's ``data`` grants, or None when it names no request-header
    CA (then no front proxy is believed)."""
    ca = data.get("requestheader-client-ca-file")
    if not isinstance(ca, str) or "BEGIN CERTIFICATE" not in ca:
        return None
    return Trust(
        ca_pem=ca,
        allowed_names=frozenset(_string_list(data.get("requestheader-allowed-names"), ())),
        username_headers=_string_list(
            data.get("requestheader-username-headers"), DEFAULT_USERNAME_HEADERS
        ),
        group_headers=_string_list(data.get("requestheader-group-headers"), DEFAULT_GROUP_HEADERS),
        extra_prefixes=_string_list(
            data.get("requestheader-extra-headers-prefix"), DEFAULT_EXTRA_PREFIXES
        ),
        uid_headers=_string_list(data.get("requestheader-uid-headers"), ()),
    )


def common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (:meth:`ssl.SSLSocket.getpeercert`)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject") or ():
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def name_allowed(trust: Trust, peercert: Mapping[str, Any] | None) -> bool:
    """Whether a connection with this verified client certificate is a front proxy."""
    return cn_allowed(trust, common_name(peercert))


def cn_allowed(trust: Trust, name: str | None) -> bool:
    """Whether a verified client certificate's CN (None: no certificate, or no CN) is
    one a front proxy may have."""
    if name is None:
        return False
    return not trust.allowed_names or name in trust.allowed_names


def user_from(trust: Trust, headers: CIMultiDictProxy[str]) -> User | None:
    """The user a trusted front proxy names, or None when it names none.

    As kube-apiserver reads them: the first non-empty user (and UID) header; every
    value of every group header; extra keys lower-cased and percent-decoded.

    This runs for every aggregated call, and kube-apiserver names the same few users
    over and over (with the same groups and extra, e.g. its credential-id), so only
    the identity headers are picked out here and the :class:`User` is built once per
    distinct set of them (:func:`_user`, a bounded cache).
    """
    names = _header_names(trust)
    picked = tuple(
        (lower, value)
        for name, value in headers.items()
        if (lower := name.lower()) in names.exact or lower.startswith(names.prefixes)
    )
    return _user(trust, picked)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _HeaderNames:
    exact: frozenset[str]
    """The user, group and UID headers, lower-cased."""
    prefixes: tuple[str, ...]
    """The extra headers' prefixes, lower-cased."""


@functools.lru_cache(maxsize=8)
def _header_names(trust: Trust) -> _HeaderNames:
    return _HeaderNames(
        exact=frozenset(h.lower() for h in (*trust.username_headers, *trust.group_headers))
        | frozenset(h.lower() for h in trust.uid_headers),
        prefixes=tuple(p.lower() for p in trust.extra_prefixes),
    )


USER_CACHE_SIZE = 1024
"""Distinct identity header sets whose :class:`User` is kept (the front proxy is
trusted, and the cache is bounded whatever it sends)."""


@functools.lru_cache(maxsize=USER_CACHE_SIZE)
def _user(trust: Trust, picked: tuple[tuple[str, str], ...]) -> User | None:
    """The user that ``picked`` (lower-cased name, value: the identity headers in the
    order they came) names, by :func:`user_from`'s rules."""

    def values(header_names: tuple[str, ...]) -> list[str]:
        wanted = [h.lower() for h in header_names]
        return [v for h in wanted for name, v in picked if name == h]

    name = next((v for v in values(trust.username_headers) if v.strip()), None)
    if name is None:
        return None
    groups = tuple(v for v in values(trust.group_headers) if v)
    extra: dict[str, list[str]] = {}
    prefixes = _header_names(trust).prefixes
    for lower, value in picked:
        for prefix in prefixes:
            if len(lower) > len(prefix) and lower.startswith(prefix):
                extra.setdefault(urllib.parse.unquote(lower[len(prefix) :]), []).append(value)
    uid = next((v for v in values(trust.uid_headers) if v), "")
    return User(
        name=name,
        uid=uid,
        groups=groups,
        extra=tuple(sorted((k, tuple(v)) for k, v in extra.items())),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingCert:
    """The aggregated API server's own certificate (its CA goes into the APIService's
    ``caBundle``)."""

    cert_file: str
    key_file: str


class TrustStore:
    """The current front-proxy trust and the TLS contexts built from it.

    Fed by a list+watch of the ConfigMap (:func:`opkeeper.gateway.kubeio.feed`).
    Until it has seen one, or when it names no CA, no client certificate verifies
    and every call is 401, while discovery keeps answering.
    """

    def __init__(self, *, serving: ServingCert) -> None:
        self._serving = serving
        self.trust: Trust | None = None
        self._current = self._context(None)
        self.listener = self._context(None)
        """The context to listen with: it hands each handshake to the current one."""
        self.listener.sni_callback = self._handshake

    def _context(self, trust: Trust | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # A connection's client certificate is the one of its handshake, for good (the
        # aggregated API reads its CN once per connection): no TLS 1.2 renegotiation.
        context.options |= ssl.OP_NO_RENEGOTIATION
        context.load_cert_chain(self._serving.cert_file, self._serving.key_file)
        # Optional: discovery and health answer clients without a certificate.
        context.verify_mode = ssl.CERT_OPTIONAL
        if trust is not None:
            context.load_verify_locations(cadata=trust.ca_pem)
        return context

    def _handshake(
        self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        sock.context = self._current

    def set(self, trust: Trust | None) -> None:
        """Trust ``trust`` from the next handshake on."""
        if trust == self.trust:
            return
        try:
            context = self._context(trust)
        except (ssl.SSLError, ValueError) as exc:
            log.error("front-proxy CA bundle not usable, keeping the previous one: %s", exc)
            return
        self.trust, self._current = trust, context
        if trust is None:
            log.warning(
                "no request-header CA in %s/%s: every aggregated call is refused (401)",
                CONFIGMAP_NAMESPACE,
                CONFIGMAP_NAME,
            )
        else:
            log.info(
                "front-proxy trust loaded (allowed names: %s)",
                ", ".join(sorted(trust.allowed_names)) or "any",
            )

    # --- kubeio.Fed ----------------------------------------------------------------

    def reset(self, objects: Iterable[Mapping[str, Any]]) -> None:
        found = [o for o in objects if (o.get("metadata") or {}).get("name") == CONFIGMAP_NAME]
        self.set(trust_from(found[0].get("data") or {}) if found else None)

    def apply(self, *, event: str, obj: Mapping[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != CONFIGMAP_NAME:
            return
        self.set(None if event == "DELETED" else trust_from(obj.get("data") or {}))
