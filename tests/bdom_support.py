"""Speaking BDOM to a running gateway in tests: HTTP with Basic auth, keys with a chosen
user id, answers parsed into comparable shapes.

A plain module like tests/gateway_support.py: the cluster tests, the hostile
suite's adapter and the benchmark's checks use the same small client.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import kubernetes

from opkeeper.gateway import auth
from tests.gateway_support import RunningGateway
from tests.helpers import wait_for


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    """Lower-cased names."""
    body: bytes

    @property
    def xml(self) -> ET.Element:
        return ET.fromstring(self.body)

    def responses(self) -> list[dict[str, str]]:
        """The ``<response>`` elements as tag -> text (one for a bare ``<response>``)."""
        root = self.xml
        items = [root] if root.tag == "response" else list(root)
        assert root.tag in ("response", "multiresponse"), self.body
        return [{child.tag: child.text or "" for child in item} for item in items]

    def tags(self) -> list[list[str]]:
        root = self.xml
        items = [root] if root.tag == "response" else list(root)
        return [[child.tag for child in item] for item in items]


def basic(user: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode("ascii")


def request(
    port: int,
    method: str,
    path: str,
    *,
    authorization: str | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request with a raw path (sent exactly as given, never normalised here)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "text/xml"} if body is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return Reply(
            status=response.status,
            headers={k.lower(): v for k, v in response.getheaders()},
            body=data,
        )
    finally:
        connection.close()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Client:
    """A BDOM caller: a user id and its key against one gateway."""

    port: int
    user_id: str
    key: str

    @property
    def authorization(self) -> str:
        return basic(self.user_id, self.key)

    def get(self, path: str) -> Reply:
        return request(self.port, "GET", path, authorization=self.authorization)

    def post(self, path: str, body: bytes) -> Reply:
        return request(self.port, "POST", path, authorization=self.authorization, body=body)

    def status(
        self, task: object = "-", state: str = "-", obj: str = "-", name: str = "-"
    ) -> Reply:
        return self.get(f"/bdom/task/status/{task}/{state}/{obj}/{name}/{self.user_id}/")

    def scheduled(self) -> Reply:
        return self.get(f"/bdom/task/scheduled/-/-/-/-/{self.user_id}/")

    def delete(self, body: bytes) -> Reply:
        return self.post(f"/bdom/task/delete/-/-/-/-/{self.user_id}/", body)

    def create(self, **fields: Any) -> Reply:
        return self.post(f"/bdom/task/create/-/-/-/-/{self.user_id}/", create_body(**fields))


def create_body(
    *,
    opcode: str,
    name: str,
    object_: str = "domain",
    exec_date: str | None = None,
    tld_id: int | None = None,
    params: Mapping[str, str] | None = None,
    **labels: str,
) -> bytes:
    parts = [f"<opcode>{opcode}</opcode>", f"<object>{object_}</object>", f"<name>{name}</name>"]
    if exec_date is not None:
        parts.append(f"<exec-date>{exec_date}</exec-date>")
    if tld_id is not None:
        parts.append(f"<tld_id>{tld_id}</tld_id>")
    parts += [f"<{k}>{v}</{k}>" for k, v in labels.items()]
    if params:
        parts.append(
            "<params>"
            + "".join(f'<param name="{k}">{v}</param>' for k, v in params.items())
            + "</params>"
        )
    return f"<request><create>{''.join(parts)}</create></request>".encode()


def delete_body(*ids: object) -> bytes:
    """The seed's delete body (Example 6.3) with these ids."""
    items = " ".join(f"<task_id>{i}</task_id>" for i in ids)
    return (
        '<?xml version="1.0" encoding="UTF-8"?> <request xmlns:xsi='
        f'"http://www.w3.org/2001/XMLSchema-instance"> <delete> {items} </delete> </request>'
    ).encode()


def make_user_key(
    api: kubernetes.client.ApiClient, gw: RunningGateway, *, tenant: str, user_id: str
) -> Client:
    """A key for ``user_id`` on ``tenant``, once the gateway's key ring has it."""
    key = auth.new_key()
    manifest = auth.key_secret(
        name=f"key-{uuid.uuid4().hex[:8]}",
        namespace=gw.key_namespace,
        key=key,
        user_id=user_id,
        tenant=tenant,
    )
    kubernetes.client.CoreV1Api(api).create_namespaced_secret(gw.key_namespace, manifest)
    client = Client(port=gw.port, user_id=user_id, key=key)
    wait_for(lambda: client.status().status == 200, what="the key to reach the gateway")
    return client
