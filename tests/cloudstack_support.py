"""CloudStack credentials for the tests: the apiKey and secretKey of an opkeeper API key.

The apiKey is the key's hash; the secretKey derives from the gateway's master
key, which the gateway reads (or creates) on its first CloudStack request. A
request with the apiKey and no signature makes it do so (and is refused);
the key is then read from the running gateway, in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import urllib.error
import urllib.parse
import urllib.request

from opkeeper.gateway import auth
from opkeeper.gateway.dialects import cloudstack
from tests.gateway_support import RunningGateway


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pair:
    api_key: str
    secret: str


def pair(gw: RunningGateway, key: str) -> Pair:
    """The CloudStack credentials of ``key`` on ``gw``."""
    key_hash = auth.hash_key(key)
    api_key = cloudstack.api_key(key_hash)
    secrets = gw.gateway.cloudstack.secrets
    if secrets.loaded is None:
        query = urllib.parse.urlencode({"command": "listApis", "apiKey": api_key})
        # Unsigned: refused (401), after the gateway has read the master key.
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"{gw.base}/client/api?{query}", timeout=30).close()
    master = secrets.loaded
    assert master is not None, "the gateway has not read its CloudStack master key"
    return Pair(api_key=api_key, secret=cloudstack.secret_key(master=master, key_hash=key_hash))


def signed_url(base: str, params: dict[str, str], *, secret: str) -> str:
    """A GET URL of ``params`` with their signature, encoded as ``cs`` and requests do."""
    signature = cloudstack.sign(list(params.items()), secret=secret)
    return f"{base}/client/api?" + urllib.parse.urlencode({**params, "signature": signature})
