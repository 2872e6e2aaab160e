"""The hardened XML-RPC codec, checked against Python's own xmlrpc.client."""

from __future__ import annotations

import contextlib
import datetime
import time
import xmlrpc.client

import defusedxml
import defusedxml.ElementTree
import pytest
from hypothesis import given
from hypothesis import strategies as st

from opkeeper.gateway import xmlrpc as codec

UTC = datetime.UTC


def call(method: str, *params: object) -> bytes:
    return xmlrpc.client.dumps(tuple(params), method).encode("utf-8")


def roundtrip(value: object) -> object:
    (decoded,), _ = xmlrpc.client.loads(codec.encode_response(value), use_builtin_types=True)
    return decoded


def test_decodes_what_python_sends() -> None:
    body = call(
        "operation_list",
        "session-token",
        {
            "updated_after": xmlrpc.client.DateTime("2006-01-01"),
            "updated_before": xmlrpc.client.DateTime(datetime.datetime(2006, 2, 1)),
            "state": "DONE",
            "n": 42,
            "ok": True,
            "ratio": 0.5,
            "blob": xmlrpc.client.Binary(b"\x00\x01"),
            "nested": [1, {"a": "b"}, []],
        },
    )
    decoded = codec.decode_call(body)
    assert decoded.method == "operation_list"
    session, flt = decoded.params
    assert session == "session-token"
    assert isinstance(flt, dict)
    assert flt["updated_after"] == datetime.datetime(2006, 1, 1, tzinfo=UTC)
    assert flt["updated_before"] == datetime.datetime(2006, 2, 1, tzinfo=UTC)
    assert flt["state"] == "DONE"
    assert flt["n"] == 42
    assert flt["ok"] is True
    assert flt["ratio"] == 0.5
    assert flt["blob"] == b"\x00\x01"
    assert flt["nested"] == [1, {"a": "b"}, []]


def test_untyped_value_is_a_string_and_whitespace_is_kept() -> None:
    body = (
        b"<?xml version='1.0'?><methodCall><methodName>m</methodName><params>"
        b"<param><value>  hi  </value></param><param><value><i4> 7 </i4></value></param>"
        b"</params></methodCall>"
    )
    assert codec.decode_call(body).params == ("  hi  ", 7)


def test_no_params_element_is_fine() -> None:
    body = b"<methodCall><methodName>log</methodName></methodCall>"
    assert codec.decode_call(body).params == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20060101T00:00:00", datetime.datetime(2006, 1, 1, tzinfo=UTC)),
        ("2006-01-01", datetime.datetime(2006, 1, 1, tzinfo=UTC)),
        ("2006-01-01T10:11:12", datetime.datetime(2006, 1, 1, 10, 11, 12, tzinfo=UTC)),
        ("20060101T101112Z", datetime.datetime(2006, 1, 1, 10, 11, 12, tzinfo=UTC)),
        ("2006-01-01T12:00:00+02:00", datetime.datetime(2006, 1, 1, 10, tzinfo=UTC)),
        ("2006-01-01T12:00:00.250-01:30", datetime.datetime(2006, 1, 1, 13, 30, tzinfo=UTC)),
    ],
)
def test_datetime_forms(text: str, expected: datetime.datetime) -> None:
    assert codec.parse_datetime(text) == expected


@pytest.mark.parametrize("text", ["2006-13-01", "yesterday", "2006-01-01T25:00:00", ""])
def test_bad_datetimes(text: str) -> None:
    with pytest.raises(codec.InvalidRequest, match="dateTime"):
        codec.parse_datetime(text)


def _wrap(value_xml: str) -> bytes:
    return (
        "<methodCall><methodName>m</methodName><params><param>"
        f"{value_xml}</param></params></methodCall>"
    ).encode()


@pytest.mark.parametrize(
    ("value_xml", "error", "match"),
    [
        ("<value><i8>5</i8></value>", codec.InvalidRequest, "i8"),
        ("<value><nil/></value>", codec.InvalidRequest, "nil"),
        ("<value><int>2147483648</int></value>", codec.InvalidRequest, "32 bits"),
        ("<value><int>-2147483649</int></value>", codec.InvalidRequest, "32 bits"),
        ("<value><int>12a</int></value>", codec.InvalidRequest, "bad <int>"),
        ("<value><boolean>true</boolean></value>", codec.InvalidRequest, "boolean"),
        ("<value><double>nan</double></value>", codec.InvalidRequest, "double"),
        ("<value><double>1e999</double></value>", codec.InvalidRequest, "range"),
        ("<value><base64>!!!</base64></value>", codec.InvalidRequest, "base64"),
        ("<value><ex:nil xmlns:ex='x'/></value>", codec.InvalidRequest, "unexpected"),
        ("<value><int>1</int><int>2</int></value>", codec.InvalidRequest, "exactly one"),
        ("<value>x<int>1</int></value>", codec.InvalidRequest, "text next to"),
        (
            "<value><struct><member><name>a</name></member></struct></value>",
            codec.InvalidRequest,
            "needs a <name> and a <value>",
        ),
        (
            "<value><struct><member><name>a</name><value>1</value></member>"
            "<member><name>a</name><value>2</value></member></struct></value>",
            codec.InvalidRequest,
            "duplicate",
        ),
        ("<value><array><value>1</value></array></value>", codec.InvalidRequest, "unexpected"),
        ("<value><array></array></value>", codec.InvalidRequest, "<data>"),
        ("<value><struct>text</struct></value>", codec.InvalidRequest, "unexpected text"),
        ("", codec.InvalidRequest, "needs a <value>"),
    ],
)
def test_strict_types(value_xml: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        codec.decode_call(_wrap(value_xml))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<methodCall><methodName>m</methodName>", codec.MalformedXml),
        (b"not xml at all", codec.MalformedXml),
        (b"", codec.MalformedXml),
        (b"<methodResponse/>", codec.InvalidRequest),
        (b"<methodCall><params/></methodCall>", codec.InvalidRequest),
        (b"<methodCall><methodName>a b</methodName></methodCall>", codec.InvalidRequest),
        (
            b"<methodCall><methodName>a</methodName><methodName>b</methodName></methodCall>",
            codec.InvalidRequest,
        ),
    ],
)
def test_malformed(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec.decode_call(body)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<methodCall><methodName>login</methodName><params><param><value>&lol4;</value></param>
</params></methodCall>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>login</methodName><params><param><value>&xxe;</value></param>
</params></methodCall>"""

DTD_ONLY = b"""<?xml version="1.0"?><!DOCTYPE methodCall SYSTEM "http://example.invalid/x.dtd">
<methodCall><methodName>login</methodName></methodCall>"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE, DTD_ONLY])
def test_entities_and_dtds_are_refused(body: bytes) -> None:
    with pytest.raises(codec.ForbiddenXml):
        codec.decode_call(body)


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE, DTD_ONLY])
def test_refuses_whatever_defusedxml_refuses(body: bytes) -> None:
    # The codec uses defusedxml's expat-level parser; its ElementTree parser is an
    # independent reference for what must be refused.
    reference = defusedxml.ElementTree.DefusedXMLParser(
        forbid_dtd=True, forbid_entities=True, forbid_external=True
    )
    with pytest.raises(defusedxml.DefusedXmlException) as refused:
        reference.feed(body)
    with pytest.raises(codec.ForbiddenXml, match=type(refused.value).__name__):
        codec.decode_call(body)


def test_undeclared_entity_is_malformed() -> None:
    with pytest.raises(codec.MalformedXml):
        codec.decode_call(_wrap("<value>&boom;</value>"))


def test_body_limit() -> None:
    limits = codec.Limits(max_body_bytes=100)
    with pytest.raises(codec.BodyTooLarge):
        codec.decode_call(call("m", "x" * 200), limits=limits)


def test_depth_limit() -> None:
    nested: object = 1
    for _ in range(10):
        nested = [nested]
    body = call("m", nested)
    codec.decode_call(body, limits=codec.Limits(max_depth=10))
    with pytest.raises(codec.LimitExceeded, match="nested"):
        codec.decode_call(body, limits=codec.Limits(max_depth=9))


def test_depth_limit_holds_for_absurd_nesting() -> None:
    body = _wrap("<value><array><data>" * 5000 + "</data></array></value>" * 5000)
    with pytest.raises(codec.LimitExceeded):
        codec.decode_call(body)


def test_element_limit() -> None:
    body = call("m", list(range(100)))
    with pytest.raises(codec.LimitExceeded, match="elements"):
        codec.decode_call(body, limits=codec.Limits(max_elements=150))


# --- encoding -------------------------------------------------------------------------


def test_encodes_standard_types() -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    value = {
        "i": 2**31 - 1,
        "neg": -(2**31),
        "b": False,
        "s": "a<b>&c\r\n",
        "f": 1.5,
        "d": when,
        "bin": b"\xff",
        "l": [1, "x", [True]],
        "t": (1, 2),
    }
    assert roundtrip(value) == {
        **value,
        "d": datetime.datetime(2024, 5, 6, 7, 8, 9),  # XML-RPC dateTime carries no zone
        "t": [1, 2],
    }


def test_datetime_is_written_in_utc_classic_form() -> None:
    tz = datetime.timezone(datetime.timedelta(hours=2))
    body = codec.encode_response(datetime.datetime(2024, 1, 1, 2, 0, tzinfo=tz)).decode()
    assert "<dateTime.iso8601>20240101T00:00:00</dateTime.iso8601>" in body


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (2**31, "32-bit"),
        (-(2**31) - 1, "32-bit"),
        ({"id": 10**12}, "32-bit"),
        (None, "null"),
        ({"a": None}, "null"),
        (float("nan"), "no XML-RPC form"),
        ("\x00", "U\\+0000"),
        ({1: "x"}, "strings"),
        (object(), "no XML-RPC type"),
    ],
)
def test_not_representable(value: object, match: str) -> None:
    with pytest.raises(codec.NotRepresentable, match=match):
        codec.encode_response(value)


def test_never_writes_extensions() -> None:
    body = codec.encode_response({"a": [1, True, "x", 2.0]}).decode()
    assert "<i8>" not in body
    assert "<nil" not in body


@pytest.mark.parametrize("text", ["", " spaced ", "a&<b>]]>", "é\n\tü", "0", "1.5"])
def test_bare_strings_read_back_as_strings(text: str) -> None:
    value = {"s": text, "list": [text, 1], "nested": {"t": text}}
    body = codec.encode_response(value, bare_strings=True)
    assert b"<string>" not in body
    (decoded,), _ = xmlrpc.client.loads(body, use_builtin_types=True)
    assert decoded == value


def test_fault_roundtrip() -> None:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(codec.encode_fault(code=404, message="gone <now> \x00"))
    assert caught.value.faultCode == 404
    assert caught.value.faultString == "gone <now> \ufffd"


_TEXT = st.characters(blacklist_categories=("Cs", "Cc"))
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=codec.I4_MIN, max_value=codec.I4_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=_TEXT),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=_TEXT, max_size=5), children, max_size=4)
    ),
    max_leaves=20,
).filter(lambda v: v is not None)


def _strip_nones(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nones(v) for v in value if v is not None]
    return value


@given(json_like.map(_strip_nones))
def test_python_client_sees_what_we_encode(value: object) -> None:
    assert roundtrip(value) == value


@given(json_like.map(_strip_nones))
def test_we_decode_what_python_encodes(value: object) -> None:
    assert codec.decode_call(call("m", value)).params == (value,)


@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_error(body: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode_call(body)


# --- cost: every body is answered in linear time ------------------------------------

_NEAR_LIMIT = codec.DEFAULT_LIMITS.max_body_bytes - 200


def _worst_bodies() -> dict[str, bytes]:
    digits = "1" * _NEAR_LIMIT
    return {
        "double, 16,000 digits then a non-digit": _wrap(
            f"<value><double>{'1' * 16_000}x</double></value>"
        ),
        "double, 1 MiB of digits": _wrap(f"<value><double>{digits}</double></value>"),
        "double, 1 MiB of digits with a dot": _wrap(
            f"<value><double>{digits[:-2]}.</double></value>"
        ),
        "int, 1 MiB of digits": _wrap(f"<value><int>{digits}</int></value>"),
        "dateTime, 1 MiB": _wrap(f"<value><dateTime.iso8601>{digits}</dateTime.iso8601></value>"),
        "string, 1 MiB": _wrap(f"<value><string>{'Q' * _NEAR_LIMIT}</string></value>"),
        "base64, 1 MiB": _wrap(f"<value><base64>{'QUFB' * (_NEAR_LIMIT // 4)}</base64></value>"),
        "member name, 1 MiB": _wrap(
            f"<value><struct><member><name>{'n' * _NEAR_LIMIT}</name>"
            "<value>1</value></member></struct></value>"
        ),
        "method name, 1 MiB": (
            f"<methodCall><methodName>{'m' * _NEAR_LIMIT}</methodName></methodCall>"
        ).encode(),
        "deep": _wrap("<value><array><data>" * 20_000),
        "wide": _wrap(
            "<value><array><data>"
            + "<value><int>1</int></value>" * 38_000
            + "</data></array></value>"
        ),
        "wide struct": _wrap(
            "<value><struct>"
            + "".join(f"<member><name>m{i}</name><value>1</value></member>" for i in range(20_000))
            + "</struct></value>"
        ),
    }


@pytest.mark.parametrize("kind", sorted(_worst_bodies()))
def test_worst_case_bodies_cost_little_cpu(kind: str) -> None:
    """Each answered (decoded or refused as the client's fault) within a fixed CPU budget:
    the quadratic number pattern once took 7 s for 16,000 digits."""
    body = _worst_bodies()[kind]
    assert len(body) <= codec.DEFAULT_LIMITS.max_body_bytes
    started = time.process_time()
    with contextlib.suppress(codec.CodecError):
        codec.decode_call(body)
    assert time.process_time() - started < 0.5, kind


@pytest.mark.parametrize(
    ("value_xml", "match"),
    [
        ("<value><double>" + "1" * 65 + "</double></value>", "longer than 64"),
        ("<value><int>" + "9" * 5000 + "</int></value>", "longer than 64"),
        ("<value><int>000000000000000000000000000001</int></value>", None),
        ("<value><dateTime.iso8601>20060101T00:00:00+99:00</dateTime.iso8601></value>", "offset"),
        ("<value><dateTime.iso8601>20060101T00:00:00+23:60</dateTime.iso8601></value>", "offset"),
        ("<value><dateTime.iso8601>00010101T00:00:00+01:00</dateTime.iso8601></value>", "range"),
        ("<value><dateTime.iso8601>99991231T23:59:59-01:00</dateTime.iso8601></value>", "range"),
        ("<value><string>" + "s" * (64 * 1024 + 1) + "</string></value>", "longer than"),
    ],
)
def test_client_caused_parse_errors_are_client_faults(value_xml: str, match: str | None) -> None:
    """Never an internal error: each is a CodecError (a bad-argument fault)."""
    if match is None:
        assert codec.decode_call(_wrap(value_xml)).params == (1,)
        return
    with pytest.raises(codec.CodecError, match=match) as caught:
        codec.decode_call(_wrap(value_xml))
    assert len(str(caught.value)) < 200


def test_printable_replaces_what_xml_cannot_carry() -> None:
    assert codec.printable("plain text") == "plain text"
    assert codec.printable("a\x00b\x01c\ufffe") == "a\ufffdb\ufffdc\ufffd"
    assert roundtrip(codec.printable("tab\there\nnewline")) == "tab\there\nnewline"
