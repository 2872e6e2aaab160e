"""API keys as Secrets: what ``opkeeper apikey create | list | revoke`` and ``make dev`` do.

The Secret format is :mod:`opkeeper.gateway.auth`'s (the gateway's key ring
reads it: ``keyHash``, ``userId``, ``namespace``, labelled
``opkeeper.dev/api-key``); this module is the one place that creates, lists
and deletes such Secrets. :func:`create` returns the key once: only its hash
is stored, so nothing can show it again, and :func:`list_keys` has only
names, tenants, users and creation times to show.

The pure parts (user ids, Secret names, parsing a listed Secret, the
credentials and the ready-to-paste client snippet of each dialect) are apart
from the calls to the API server, so they are tested without one.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import re
import secrets
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from opkeeper import errors, keys, kube, names, states
from opkeeper.gateway import auth
from opkeeper.gateway.dialects import cloudstack

DEFAULT_KEY_NAMESPACE = "opkeeper-system"
"""Where the gateway reads keys from unless told otherwise (``auth.KeyRingSettings``)."""
DEFAULT_SYSTEM_NAMESPACE = "opkeeper-system"
"""Where the gateway keeps its shared keys unless told otherwise (its ``--system-namespace``):
the CloudStack secret keys derive from the master key there."""
DEFAULT_URL = "http://127.0.0.1:8480"
"""The gateway's base URL in the snippets: where ``opkeeper gateway`` and ``make dev``
listen by default."""
USER_ID_MAX = 253
SECRET_PREFIX = "apikey-"
_SLUG_MAX = 40
"""Characters of the user id kept in a Secret name: a name stays at most 54 characters,
readable in ``kubectl get secrets``; the random suffix makes it unique."""

# A user id is written into log lines (the call log, the gateway's log), is the
# Gandi login argument, and is the user part of a gocept URL's ``user:key@host``.
# So: no whitespace or control characters (a log line stays one unforgeable line),
# no ':' (it ends the user name in Basic auth and in a URL), no '/', '%' or quotes.
# '@' and '.' are allowed because user ids are often e-mail addresses.
_USER_ID = re.compile(r"[A-Za-z0-9._@-]+")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def user_id(value: object) -> str:
    """A user id: 1-253 ASCII letters, digits, ``.``, ``_``, ``@`` and ``-``; else
    :class:`opkeeper.names.InvalidName`."""
    if not isinstance(value, str):
        problem = "must be a string"
    elif not value:
        problem = "must not be empty"
    elif len(value) > USER_ID_MAX:
        problem = f"{names.shown(value)} is longer than {USER_ID_MAX} characters"
    elif not _USER_ID.fullmatch(value):
        problem = f"{names.shown(value)} may hold only ASCII letters, digits, '.', '_', '@' and '-'"
    else:
        return value
    raise names.InvalidName(f"user id {problem}", what="user id", value=value)


def secret_name(*, user: str) -> str:
    """A fresh Secret name ``apikey-<user-slug>-<6 random hex>``: the user is readable
    in ``kubectl get secrets``, and one user may hold several keys."""
    slug = _NOT_SLUG.sub("-", user.lower()).strip("-")[:_SLUG_MAX].strip("-")
    suffix = secrets.token_hex(3)
    # A user id without a letter or digit ("...") leaves no slug: the suffix alone then.
    return names.object_name(f"{SECRET_PREFIX}{slug}-{suffix}" if slug else SECRET_PREFIX + suffix)


def gateway_url(value: object) -> str:
    """A gateway base URL for the snippets: http(s), a host, no credentials, query or
    fragment (the snippets add the credentials and ``/xmlrpc``); returned without a
    trailing slash."""
    if not isinstance(value, str):
        raise errors.InvalidArgument("URL must be a string")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidArgument(f"URL {names.shown(value)} is not an http(s)://host URL")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise errors.InvalidArgument(
            f"URL {names.shown(value)}: give the gateway's base URL, without credentials,"
            " query or fragment"
        )
    return value.rstrip("/")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiKey:
    """A key Secret as ``list`` and ``revoke`` show it: never the key (it is not stored)."""

    name: str
    """The Secret's name (in the key namespace)."""
    namespace: str
    """The tenant: the one namespace the key may use."""
    user_id: str
    created: str
    """The Secret's creationTimestamp, as the API server wrote it (RFC 3339, UTC)."""

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "userId": self.user_id,
            "created": self.created,
        }


def parse(secret: Mapping[str, Any]) -> ApiKey | None:
    """The key record of a Secret as the API server returns it, or None if it is not an
    API key Secret (no label) or lacks a field the gateway needs (the gateway ignores it
    too, with a warning in its log)."""
    meta = secret.get("metadata") or {}
    if auth.LABEL not in (meta.get("labels") or {}):
        return None
    tenant, user = auth.secret_field(secret, "namespace"), auth.secret_field(secret, "userId")
    if not tenant or not user or not auth.secret_field(secret, "keyHash"):
        return None
    return ApiKey(
        name=str(meta.get("name")),
        namespace=tenant,
        user_id=user,
        created=str(meta.get("creationTimestamp") or ""),
    )


def table(keys: Iterable[ApiKey]) -> str:
    """``list -o text``: kubectl-style aligned columns."""
    rows = [("NAME", "NAMESPACE", "USER", "CREATED")]
    rows += [(k.name, k.namespace, k.user_id, k.created) for k in keys]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewKey:
    """A key just created: the only moment the key itself is known."""

    name: str
    """The Secret's name."""
    key_namespace: str
    """Where the Secret lives."""
    namespace: str
    """The tenant."""
    user_id: str
    api_key: str = dataclasses.field(repr=False)
    """Kept out of repr, so a traceback or a log line never shows it."""
    cloudstack_secret: str = dataclasses.field(default="", repr=False)
    """The CloudStack secretKey (derived from the key's hash and the gateway's master key,
    so it is the same whenever it is derived; never stored)."""

    @property
    def cloudstack_api_key(self) -> str:
        """The CloudStack apiKey: the key's hash, which is not a secret."""
        return cloudstack.api_key(auth.hash_key(self.api_key))

    def to_json(self) -> dict[str, Any]:
        """``create -o json``: the key, and each dialect's credentials as its member."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "userId": self.user_id,
            "apiKey": self.api_key,
            **{str(form.dialect): form.credentials(self) for form in CLIENT_FORMS},
        }

    def text(self, *, url: str) -> str:
        """``create -o text``: the credentials as comments, then one snippet per dialect;
        the whole text is Python, so it can be pasted (or run) as it is."""
        header = (
            f"# API key of user {self.user_id} for namespace {self.namespace}"
            f" (Secret {self.key_namespace}/{self.name}).\n"
            "# Shown only now: the cluster keeps only its hash.\n"
            f"#   user id: {self.user_id}\n"
            f"#   API key: {self.api_key}\n"
        )
        blocks = [f"# {form.title}\n{form.snippet(key=self, url=url)}" for form in CLIENT_FORMS]
        return "\n".join([header, *blocks])


class _Snippet(Protocol):
    def __call__(self, *, key: NewKey, url: str) -> str: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientForm:
    """How one dialect's clients present a key. A new dialect adds one entry to
    :data:`CLIENT_FORMS`: its member of ``create -o json`` and its snippet."""

    dialect: states.Dialect
    title: str
    """The snippet's heading comment."""
    credentials: Callable[[NewKey], dict[str, str]]
    """The dialect's member of ``create -o json``, in the dialect's own words."""
    snippet: _Snippet
    """Python that uses the key against the gateway at ``url`` (its base URL)."""


def _gandi_snippet(*, key: NewKey, url: str) -> str:
    return (
        "import pprint, xmlrpc.client\n"
        f"gandi = xmlrpc.client.ServerProxy({url + '/xmlrpc'!r})\n"
        f"session = gandi.login({key.user_id!r}, {key.api_key!r})\n"
        "for opid in gandi.operation_list(session, {}):\n"
        "    pprint.pprint(gandi.operation_details(session, opid))\n"
    )


def _gocept_snippet(*, key: NewKey, url: str) -> str:
    # xmlrpc.client sends the URL's user:password as Basic auth, percent-decoded;
    # keys are URL-safe base64, a user id may hold '@'.
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.quote(key.user_id, safe="")
    with_auth = parts._replace(netloc=f"{user}:{key.api_key}@{parts.netloc}")
    return (
        "import pprint, xmlrpc.client\n"
        f"gocept = xmlrpc.client.ServerProxy({with_auth.geturl() + '/xmlrpc'!r})\n"
        "pprint.pprint(gocept.query('operation', {}))\n"
    )


def _bdom_path(*, url: str, user_id: str, opcode: str) -> str:
    return f"{url}/bdom/task/{opcode}/-/-/-/-/{urllib.parse.quote(user_id, safe='@')}/"


def _bdom_curl(key: NewKey, *, url: str) -> list[str]:
    """Ready-to-paste shell lines: list the tasks, list the scheduled ones, schedule a
    domain delete, delete a task (user ids and keys hold no shell metacharacters)."""
    auth_ = f"-u '{key.user_id}:{key.api_key}'"
    xml = "-H 'Content-Type: text/xml' --data-binary"
    path = functools.partial(_bdom_path, url=url, user_id=key.user_id)
    return [
        f"curl -sS {auth_} {path(opcode='status')}",
        f"curl -sS {auth_} {path(opcode='scheduled')}",
        f"curl -sS {auth_} {xml} '<request><create><opcode>delete</opcode><object>domain"
        "</object><name>example.org</name><exec-date>2030-01-01</exec-date></create></request>'"
        f" {path(opcode='create')}",
        f"curl -sS {auth_} {xml} '<request><delete><task_id>TASK_ID</task_id></delete>"
        f"</request>' {path(opcode='delete')}",
    ]


def _bdom_snippet(*, key: NewKey, url: str) -> str:
    # The text is Python as a whole, so the curl lines are comments (paste them without
    # the leading '# '); the Python below makes the first one's request.
    curl = "".join(f"#   {line}\n" for line in _bdom_curl(key, url=url))
    token = base64.b64encode(f"{key.user_id}:{key.api_key}".encode()).decode("ascii")
    return (
        f"# with curl:\n{curl}"
        "import urllib.request\n"
        "bdom = urllib.request.Request(\n"
        f"    {_bdom_path(url=url, user_id=key.user_id, opcode='status')!r},\n"
        f"    headers={{'Authorization': {'Basic ' + token!r}}},\n"
        ")\n"
        "print(urllib.request.urlopen(bdom).read().decode())\n"
    )


def _cloudstack_snippet(*, key: NewKey, url: str) -> str:
    return (
        "import pprint\n"
        "from cs import CloudStack  # pip install cs\n"
        "cloudstack = CloudStack(\n"
        f"    endpoint={url + '/client/api'!r},\n"
        f"    key={key.cloudstack_api_key!r},\n"
        f"    secret={key.cloudstack_secret!r},\n"
        ")\n"
        "pprint.pprint(cloudstack.listAsyncJobs())\n"
    )


def _xenapi_snippet(*, key: NewKey, url: str) -> str:
    return (
        "import pprint, XenAPI  # pip install XenAPI\n"
        f"xen = XenAPI.Session({url + '/xenapi'!r})\n"
        f"xen.xenapi.login_with_password({key.user_id!r}, {key.api_key!r}, '2.21', 'opkeeper')\n"
        "for ref, task in xen.xenapi.task.get_all_records().items():\n"
        "    pprint.pprint(task)\n"
        "xen.xenapi.session.logout()\n"
    )


CLIENT_FORMS: tuple[ClientForm, ...] = (
    ClientForm(
        dialect=states.Dialect.GANDI,
        title="Gandi API v1: xmlrpc.client, login(login, password)",
        credentials=lambda key: {"login": key.user_id, "password": key.api_key},
        snippet=_gandi_snippet,
    ),
    ClientForm(
        dialect=states.Dialect.GOCEPT,
        title="gocept: xmlrpc.client, HTTP Basic auth",
        credentials=lambda key: {"username": key.user_id, "password": key.api_key},
        snippet=_gocept_snippet,
    ),
    ClientForm(
        dialect=states.Dialect.BDOM,
        title="BDOM REST: curl or urllib, HTTP Basic auth (the key as password)",
        credentials=lambda key: {
            "username": key.user_id,
            "password": key.api_key,
            "statusPath": _bdom_path(url="", user_id=key.user_id, opcode="status"),
        },
        snippet=_bdom_snippet,
    ),
    ClientForm(
        dialect=states.Dialect.CLOUDSTACK,
        title="CloudStack: the cs package, signed requests (apiKey, secretKey)",
        credentials=lambda key: {
            "apiKey": key.cloudstack_api_key,
            "secretKey": key.cloudstack_secret,
        },
        snippet=_cloudstack_snippet,
    ),
    ClientForm(
        dialect=states.Dialect.XENAPI,
        title="XenAPI: the XenAPI package, login_with_password(username, password)",
        credentials=lambda key: {"username": key.user_id, "password": key.api_key},
        snippet=_xenapi_snippet,
    ),
)
"""The dialects the gateway serves today, in the order ``create`` shows them."""


async def cloudstack_master(client: kube.Client, *, system_namespace: str) -> bytes:
    """The master key CloudStack secret keys derive from (created if there is none yet,
    exactly as the gateway would)."""
    secret = keys.KeyedSecret(client, namespace=system_namespace, name=cloudstack.MASTER_KEY_SECRET)
    return await secret.key()


async def create(
    client: kube.Client,
    *,
    key_namespace: str,
    tenant: str,
    user: str,
    system_namespace: str = DEFAULT_SYSTEM_NAMESPACE,
) -> NewKey:
    """Create a key Secret granting ``tenant`` to ``user``; the key namespace is created
    if it does not exist yet (a fresh cluster). The CloudStack secretKey is derived with
    the master key of ``system_namespace`` (the gateway's ``--system-namespace``)."""
    key = auth.new_key()
    manifest = auth.key_secret(
        name=secret_name(user=user), namespace=key_namespace, key=key, user_id=user, tenant=tenant
    )
    try:
        created = await client.create(kube.SECRETS, manifest, namespace=key_namespace)
    except errors.NotFound:
        # Only then: creating a namespace needs a right that creating a Secret does not.
        await kube.ensure_namespace(client, key_namespace)
        created = await client.create(kube.SECRETS, manifest, namespace=key_namespace)
    master = await cloudstack_master(client, system_namespace=system_namespace)
    return NewKey(
        name=created["metadata"]["name"],
        key_namespace=key_namespace,
        namespace=tenant,
        user_id=user,
        api_key=key,
        cloudstack_secret=cloudstack.secret_key(master=master, key_hash=auth.hash_key(key)),
    )


async def _listed(
    client: kube.Client, *, key_namespace: str
) -> list[tuple[ApiKey, Mapping[str, Any]]]:
    listed = await client.list(kube.SECRETS, namespace=key_namespace, label_selector=auth.LABEL)
    return [(key, secret) for secret in listed.items if (key := parse(secret)) is not None]


async def list_keys(
    client: kube.Client, *, key_namespace: str, tenant: str | None = None
) -> list[ApiKey]:
    """The keys in ``key_namespace`` (those granting ``tenant``, if given), ordered by
    tenant, user and creation."""
    keys = [k for k, _ in await _listed(client, key_namespace=key_namespace)]
    return sorted(
        (k for k in keys if tenant in (None, k.namespace)),
        key=lambda k: (k.namespace, k.user_id, k.created, k.name),
    )


async def revoke(client: kube.Client, *, key_namespace: str, name: str) -> list[ApiKey]:
    """Delete the key Secret ``name``; returns what was deleted (nothing if there is no
    such key). A Secret that is not an API key is never deleted, whatever its name."""
    found = await _listed(client, key_namespace=key_namespace)
    return await _delete(
        client, key_namespace=key_namespace, chosen=[(k, s) for k, s in found if k.name == name]
    )


async def revoke_user(
    client: kube.Client, *, key_namespace: str, tenant: str, user: str
) -> list[ApiKey]:
    """Delete every key of ``user`` for ``tenant``; returns what was deleted."""
    found = await _listed(client, key_namespace=key_namespace)
    return await _delete(
        client,
        key_namespace=key_namespace,
        chosen=[(k, s) for k, s in found if (k.namespace, k.user_id) == (tenant, user)],
    )


async def _delete(
    client: kube.Client, *, key_namespace: str, chosen: list[tuple[ApiKey, Mapping[str, Any]]]
) -> list[ApiKey]:
    deleted = []
    for key, secret in chosen:
        try:
            # The uid precondition: a Secret re-created under that name since the list
            # (perhaps no longer a key) is not ours to delete.
            await client.delete(
                kube.SECRETS, name=key.name, namespace=key_namespace, uid=secret["metadata"]["uid"]
            )
        except (errors.NotFound, errors.Conflict):
            continue  # revoked by someone else meanwhile, or replaced: not deleted by us
        deleted.append(key)
    return deleted
