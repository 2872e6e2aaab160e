"""The one boundary for client-given names and ids, and the Kubernetes client's path check."""

from __future__ import annotations

import pytest

from opkeeper import errors, kube, names

HOSTILE_NAMES = [
    "",
    "..",
    ".",
    "../x",
    "../../other/operations/victim",
    "a/b",
    "%2F",
    "a%2Fb",
    "\\",
    "a\\b",
    "?",
    "x?watch=true",
    "#",
    "x#y",
    "x" * 254,
    "\u043e\u0440-1",  # Cyrillic look-alikes of "op-1"
    "\uff4f\uff50-1",  # fullwidth "op-1"
    "op\u200b1",  # zero-width space
    "Op-1",
    "-op",
    "op-",
    "op 1",
    "op\n",
    "op\x00",
]


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_hostile_object_names_are_bad_arguments(value: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        names.object_name(value)
    assert len(str(caught.value)) < 300  # never echoes a long input back


@pytest.mark.parametrize("value", ["op-1", "a", "example.org", "x" * 253, "1-2.3-4"])
def test_valid_object_names(value: str) -> None:
    assert names.object_name(value) == value


@pytest.mark.parametrize("value", [*HOSTILE_NAMES, "a.b", "x" * 64])
def test_hostile_namespaces(value: str) -> None:
    with pytest.raises(names.InvalidName):
        names.namespace(value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("app", "web"), ("opkeeper.dev/id", "17"), ("a_b.c-d", "A_b.9"), ("k", "")],
)
def test_valid_labels(key: str, value: str) -> None:
    assert names.labels({key: value}) == {key: value}


@pytest.mark.parametrize(
    ("key", "value"),
    [("", "v"), ("a/", "v"), ("../x/y", "v"), ("k", "-v"), ("k", "v" * 64), ("k", "a/b")],
)
def test_hostile_labels(key: str, value: str) -> None:
    with pytest.raises(names.InvalidName):
        names.labels({key: value})


@pytest.mark.parametrize("value", [0, -1, 2**31, True, "1", 1.0, None])
def test_hostile_ids(value: object) -> None:
    with pytest.raises(names.InvalidName):
        names.int_id(value)


def test_ids_at_the_edges() -> None:
    assert names.int_id(1) == 1
    assert names.int_id(2**31 - 1) == 2**31 - 1


def test_shown_cuts_long_input() -> None:
    assert names.shown("Q" * 500_000).endswith("...(cut)")
    assert len(names.shown("Q" * 500_000)) < 60
    assert names.shown("op-1") == "'op-1'"


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_the_client_never_builds_a_path_from_a_bad_name(value: str) -> None:
    with pytest.raises(names.InvalidName):
        kube.OPERATIONS.path(namespace="tenant", name=value)


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_the_client_never_builds_a_path_from_a_bad_namespace(value: str) -> None:
    with pytest.raises(names.InvalidName):
        kube.OPERATIONS.path(namespace=value, name="op-1")


def test_the_client_refuses_unknown_subresources() -> None:
    with pytest.raises(names.InvalidName):
        kube.OPERATIONS.path(namespace="t", name="op-1", subresource="../../secrets")
    assert kube.OPERATIONS.path(namespace="t", name="op-1", subresource="status").endswith(
        "/namespaces/t/operations/op-1/status"
    )
