"""The fault tables: complete, unique, stable, and documented in docs/faults.md."""

from __future__ import annotations

import inspect
import pathlib
import re
import xmlrpc.client

import pytest

from opkeeper import errors, names
from opkeeper.gateway import faults
from opkeeper.gateway import xmlrpc as codec

DOC = pathlib.Path(__file__).parent.parent / "docs" / "faults.md"


def _documented(table: faults.Table) -> dict[int, str]:
    """The rows of ``table``'s section (Gandi's codes are the six-digit ones)."""
    rows = re.findall(r"^\| (-?\d+) \| (\w+) \|", DOC.read_text(), flags=re.MULTILINE)
    gandi = table is faults.GANDI
    return {int(code): name for code, name in rows if (int(code) >= 100000) == gandi}


def _rows(table: faults.Table) -> list[faults.Row]:
    return [*table.rows, table.internal]


@pytest.mark.parametrize("table", faults.TABLES, ids=lambda t: t.name)
def test_codes_are_unique(table: faults.Table) -> None:
    rows = [r for r in _rows(table) if r is not table.internal]
    assert len({r.code for r in rows}) == len(rows)
    assert len({r.name for r in _rows(table)}) == len(_rows(table))
    assert all(r.code != 0 for r in _rows(table))


def _raised_in(table: faults.Table) -> set[type[Exception]]:
    """The error classes a table must map: every one of errors and the codec for the
    gateway's own table; for a dialect's, what can be raised once a method runs."""
    classes = {
        cls
        for module in (errors, codec)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, errors.OpkeeperError) and cls.__module__ == module.__name__
    }
    classes.discard(codec.CodecError)  # an abstract base: only its subclasses are raised
    if table is faults.XMLRPC:
        return classes
    before_a_method = {c for c in classes if issubclass(c, codec.CodecError)}
    return (classes - before_a_method) | {codec.BadParams, names.InvalidName}


@pytest.mark.parametrize("table", faults.TABLES, ids=lambda t: t.name)
def test_every_error_class_has_its_own_row(table: faults.Table) -> None:
    mapped = {row.error for row in table.rows}
    assert _raised_in(table) <= mapped, _raised_in(table) - mapped


@pytest.mark.parametrize("table", faults.TABLES, ids=lambda t: t.name)
def test_subclasses_come_before_their_bases(table: faults.Table) -> None:
    for i, row in enumerate(table.rows):
        for later in table.rows[i + 1 :]:
            assert not issubclass(later.error, row.error) or later.error is row.error, (
                f"{later.error.__name__} is shadowed by {row.error.__name__}"
            )


@pytest.mark.parametrize("table", faults.TABLES, ids=lambda t: t.name)
def test_docs_match_the_table(table: faults.Table) -> None:
    in_code = {row.code: row.name for row in table.rows}
    in_code.setdefault(table.internal.code, table.internal.name)
    assert _documented(table) == in_code


def test_published_codes_never_change() -> None:
    # Clients branch on these numbers: changing one is a breaking change, on purpose here.
    assert faults.XMLRPC.row_for(errors.NotFound("x")).code == 404
    assert faults.XMLRPC.row_for(errors.Unauthenticated("x")).code == 401
    assert faults.XMLRPC.row_for(errors.IllegalTransition("x")).code == 422
    assert faults.XMLRPC.row_for(codec.MalformedXml("x")).code == -32700
    assert faults.XMLRPC.row_for(codec.UnknownMethod("x")).code == -32601
    assert faults.XMLRPC.row_for(codec.BadParams("x")).code == -32602
    assert faults.GANDI.row_for(errors.NotFound("x")).code == 510040
    assert faults.GANDI.row_for(errors.Unauthenticated("x")).code == 500130
    assert faults.GANDI.row_for(errors.IllegalTransition("x")).code == 510060
    assert faults.GANDI.row_for(codec.BadParams("x")).code == 500010


def test_gandi_codes_follow_gandis_scheme() -> None:
    """Six digits: qualification 1 (Server) or 5 (Data), object, cause; the faultString
    says which (``ServerError:`` / ``DataError: ... [element: value]``)."""
    for row in _rows(faults.GANDI):
        assert 100000 <= row.code <= 599999, row
        assert row.code // 100000 in (1, 5), row
    with pytest.raises(names.InvalidName) as bad:
        names.object_name("../x", what="name")
    fault = faults.GANDI.fault_for(bad.value)
    assert fault.message.startswith("DataError: name '../x' is not a valid name")
    assert fault.message.endswith(" [name: ../x]")
    assert faults.GANDI.fault_for(errors.NotFound("operation 7 not found")).message == (
        "DataError: operation 7 not found"
    )
    assert faults.GANDI.fault_for(errors.Unavailable("etcd")).message == "ServerError: etcd"


class _Surprise(Exception):
    pass


@pytest.mark.parametrize(("table", "code"), [(faults.XMLRPC, -32603), (faults.GANDI, 150000)])
def test_unplanned_errors_hide_details(
    table: faults.Table, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    fault, body = table.encode(_Surprise("secret internals"))
    assert fault.code == code
    assert "secret internals" not in fault.message
    assert "incident" in fault.message
    assert "secret internals" in caplog.text  # the log keeps them
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(body)
    assert caught.value.faultCode == code


def test_message_falls_back_to_the_name() -> None:
    assert faults.XMLRPC.fault_for(errors.Conflict()).message == "conflict"
