"""The fault table: complete, unique, stable, and documented in docs/faults.md."""

from __future__ import annotations

import inspect
import pathlib
import re
import xmlrpc.client

import pytest

from opkeeper import errors
from opkeeper.gateway import faults
from opkeeper.gateway import xmlrpc as codec

DOC = pathlib.Path(__file__).parent.parent / "docs" / "faults.md"


def _documented() -> dict[int, str]:
    rows = re.findall(r"^\| (-?\d+) \| (\w+) \|", DOC.read_text(), flags=re.MULTILINE)
    return {int(code): name for code, name in rows}


def test_codes_and_names_are_unique() -> None:
    rows = [*faults.TABLE, faults.INTERNAL]
    assert len({r.code for r in rows}) == len(rows)
    assert len({r.name for r in rows}) == len(rows)
    assert all(r.code != 0 for r in rows)


def test_every_error_class_has_its_own_row() -> None:
    classes = [
        cls
        for module in (errors, codec)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, errors.OpkeeperError) and cls.__module__ == module.__name__
    ]
    classes.remove(codec.CodecError)  # an abstract base: only its subclasses are raised
    mapped = {row.error for row in faults.TABLE}
    assert set(classes) <= mapped, set(classes) - mapped


def test_subclasses_come_before_their_bases() -> None:
    for i, row in enumerate(faults.TABLE):
        for later in faults.TABLE[i + 1 :]:
            assert not issubclass(later.error, row.error) or later.error is row.error, (
                f"{later.error.__name__} is shadowed by {row.error.__name__}"
            )


def test_docs_match_the_table() -> None:
    documented = _documented()
    in_code = {row.code: row.name for row in [*faults.TABLE, faults.INTERNAL]}
    assert documented == in_code


def test_published_codes_never_change() -> None:
    # Clients branch on these numbers: changing one is a breaking change, on purpose here.
    assert faults.row_for(errors.NotFound("x")).code == 404
    assert faults.row_for(errors.Unauthenticated("x")).code == 401
    assert faults.row_for(errors.IllegalTransition("x")).code == 422
    assert faults.row_for(codec.MalformedXml("x")).code == -32700
    assert faults.row_for(codec.UnknownMethod("x")).code == -32601
    assert faults.row_for(codec.BadParams("x")).code == -32602


class _Surprise(Exception):
    pass


def test_unplanned_errors_hide_details(caplog: pytest.LogCaptureFixture) -> None:
    fault, body = faults.encode(_Surprise("secret internals"))
    assert fault.code == -32603
    assert "secret internals" not in fault.message
    assert "incident" in fault.message
    assert "secret internals" in caplog.text  # the log keeps them
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(body)
    assert caught.value.faultCode == -32603


def test_message_falls_back_to_the_name() -> None:
    assert faults.fault_for(errors.Conflict()).message == "conflict"
