"""The dialects: one module each, a thin adapter over the one domain service.

An XML-RPC dialect module has ``DIALECT`` (its :class:`opkeeper.states.Dialect`)
and ``METHODS`` (method name -> :class:`opkeeper.gateway.rpc.Method`); the
ones served on ``POST /xmlrpc`` are registered here, one line each. Adding a
dialect is one new module plus one line below.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from opkeeper.gateway import rpc
from opkeeper.gateway.dialects import gandi, gocept

XMLRPC: tuple[ModuleType, ...] = (gandi, gocept)
"""The dialects served on ``POST /xmlrpc`` (their method names never overlap)."""


def xmlrpc_methods() -> Mapping[str, rpc.Method]:
    """Every method served on ``POST /xmlrpc``, by name."""
    table: dict[str, rpc.Method] = {}
    for module in XMLRPC:
        methods: Mapping[str, rpc.Method] = module.METHODS
        clash = table.keys() & methods.keys()
        assert not clash, f"{module.__name__} redefines {sorted(clash)}"
        table.update(methods)
    return table
