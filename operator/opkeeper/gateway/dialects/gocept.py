"""The gocept dialect: ``apply``, ``query`` and ``log`` over resource records.

gocept's methods take no session argument, so the API key comes with HTTP
Basic auth (the password; the user name is free), as gocept's own clients
send it. Records are translated by :mod:`opkeeper.gateway.records`; errors
are the gateway's own faults (:data:`opkeeper.gateway.faults.XMLRPC`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opkeeper import states
from opkeeper.gateway import calllog, faults, records, rpc, xmlrpc

DIALECT = states.Dialect.GOCEPT


async def _apply(d: rpc.Dispatcher, call: rpc.Call) -> list[records.Record]:
    who = d.basic_identity(call)
    rpc.arity(call, low=1, high=1, signature="apply([record, ...])")
    call.logged_args = list(call.params)
    batch = call.params[0]
    if not isinstance(batch, list):
        raise xmlrpc.BadParams("apply takes one array of records")
    result = [rpc.wire(r) for r in await d.svc.apply(who=who, batch=batch)]
    call.logged_result = result
    return result


async def _query(d: rpc.Dispatcher, call: rpc.Call) -> list[records.Record]:
    who = d.basic_identity(call)
    rpc.arity(call, low=1, high=2, signature="query(type[, filter])")
    call.logged_args = list(call.params)
    type_ = rpc.str_arg(call.params[0], "type")
    exact = rpc.struct_arg(call.params[1], "filter") if len(call.params) == 2 else {}
    result = [rpc.wire(r) for r in d.svc.query(who=who, type_=type_, exact=exact)]
    call.logged_result = result
    return result


def _entry(entry: calllog.Entry, tenant: str) -> dict[str, Any]:
    return {
        "serial": int(entry.serial),
        "timestamp": entry.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        "method": entry.method,
        "args": entry.args_json,
        "result": entry.result_json,
        "exception": entry.exception,
        "ipaddress": entry.address,
        "resource_group": tenant,
    }


async def _call_log(d: rpc.Dispatcher, call: rpc.Call) -> list[dict[str, Any]]:
    who = d.basic_identity(call)
    rpc.arity(call, low=0, high=1, signature="log([serial])")
    serial = rpc.int_arg(call.params[0], "serial") if call.params else None
    return [_entry(e, who.tenant) for e in await d.svc.log(who=who, serial=serial)]


METHODS: Mapping[str, rpc.Method] = {
    "apply": rpc.Method(dialect=DIALECT, faults=faults.XMLRPC, handler=_apply),
    "query": rpc.Method(dialect=DIALECT, faults=faults.XMLRPC, handler=_query),
    "log": rpc.Method(dialect=DIALECT, faults=faults.XMLRPC, handler=_call_log, logged=False),
}
