"""What a Kubernetes user may do through the aggregated XML-RPC API: RBAC, asked per call.

A call through ``rpc.opkeeper.dev`` is allowed exactly when the caller could
do the same to the same objects with kubectl: each XML-RPC method maps to
the verbs it needs on ``operations.opkeeper.dev`` or
``scheduledtasks.opkeeper.dev`` in the call's namespace (:func:`checks`, a
pure function), and the API server answers each with a SubjectAccessReview
for the original user, groups and extra attributes. So RBAC (or whatever
authorizer the cluster runs) stays the one place that decides.

Decisions are cached, as kube-apiserver's webhook authorizer caches its own:
allowed for :attr:`Settings.allowed_ttl_seconds` (5 minutes), denied for
:attr:`Settings.denied_ttl_seconds` (30 seconds), at most
:attr:`Settings.max_entries` decisions (the oldest go first). A revoked
RoleBinding therefore takes effect within 5 minutes at most; a new one within
30 seconds. Concurrent identical questions share one review.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from opkeeper import GROUP, errors, kube
from opkeeper.gateway import frontproxy, records

SUBJECT_ACCESS_REVIEWS = kube.Resource(
    group="authorization.k8s.io", version="v1", plural="subjectaccessreviews", namespaced=False
)

OPERATIONS = "operations"
SCHEDULED_TASKS = "scheduledtasks"
_RESOURCE_OF: dict[str, str] = {
    "operation": OPERATIONS,
    "scheduledtask": SCHEDULED_TASKS,
}


@dataclasses.dataclass(frozen=True, kw_only=True, order=True)
class Check:
    """One permission a call needs: ``verb`` on ``resource`` in group opkeeper.dev."""

    verb: str
    resource: str


_READ_OPERATIONS = (Check(verb="get", resource=OPERATIONS),)
_LIST_OPERATIONS = (Check(verb="list", resource=OPERATIONS),)

FIXED: dict[str, tuple[Check, ...]] = {
    # Gandi
    "operation_list": _LIST_OPERATIONS,
    "operation_details": _READ_OPERATIONS,
    "operation_create": (Check(verb="create", resource=OPERATIONS),),
    "operation_relaunch": (Check(verb="patch", resource=OPERATIONS),),
    "operation_cancel": (Check(verb="patch", resource=OPERATIONS),),
    # gocept: the call log holds the namespace's calls, so it is as readable as the list
    "log": _LIST_OPERATIONS,
}
"""Methods whose permissions do not depend on their arguments."""
SERVED = frozenset({*FIXED, "query", "apply", "login"})
"""Every method the aggregated API serves: those :func:`checks` knows (``login``
needs nothing: it only answers that it is not needed)."""


def checks(method: str, params: Sequence[Any]) -> tuple[Check, ...]:
    """The permissions ``method`` called with ``params`` needs, in the call's namespace.

    gocept's ``query(type)`` needs ``list`` on that type's resource; ``apply`` needs,
    for every record, ``create`` and ``patch`` on its resource to set it (a set may
    create or change) and ``delete`` to delete it. Records that do not parse need
    nothing: the call refuses them before writing anything.
    ``login`` needs nothing: it only explains itself.
    """
    if method not in SERVED:
        raise KeyError(f"{method} has no permission mapping; it must not be served")
    fixed = FIXED.get(method)
    if fixed is not None:
        return fixed
    if method == "query":
        type_ = params[0] if params else None
        resource = _RESOURCE_OF.get(type_, OPERATIONS) if isinstance(type_, str) else OPERATIONS
        return (Check(verb="list", resource=resource),)
    if method == "apply":
        batch = params[0] if params and isinstance(params[0], list) else []
        needed: set[Check] = set()
        for index, record in enumerate(batch):
            try:
                parsed = records.parse(index, record)
            except errors.OpkeeperError:
                continue
            resource = _RESOURCE_OF[parsed.type]
            verbs = ("delete",) if parsed.action == "delete" else ("create", "patch")
            needed.update(Check(verb=v, resource=resource) for v in verbs)
        return tuple(sorted(needed))
    return ()


def review(*, user: frontproxy.User, namespace: str, check: Check) -> dict[str, Any]:
    """The SubjectAccessReview that asks whether ``user`` may do ``check`` in ``namespace``."""
    spec: dict[str, Any] = {
        "user": user.name,
        "groups": list(user.groups),
        "resourceAttributes": {
            "namespace": namespace,
            "verb": check.verb,
            "group": GROUP,
            "resource": check.resource,
        },
    }
    if user.uid:
        spec["uid"] = user.uid
    if user.extra:
        spec["extra"] = user.extra_dict()
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


class Denied(errors.Forbidden):
    """RBAC refused one of the permissions a call needs."""

    def __init__(self, *, user: frontproxy.User, namespace: str, check: Check, method: str) -> None:
        super().__init__(
            f'User "{user.name}" cannot {check.verb} resource "{check.resource}" in API group'
            f' "{GROUP}" in the namespace "{namespace}", which {method} through'
            " rpc.opkeeper.dev needs"
        )
        self.check = check


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How authorization decisions are cached."""

    allowed_ttl_seconds: float = 300.0
    """How long an allowed decision is reused (default 5 minutes, kube-apiserver's
    webhook authorizer default)."""
    denied_ttl_seconds: float = 30.0
    """How long a denied decision is reused (default 30 seconds, likewise)."""
    max_entries: int = 10_000
    """Decisions kept at most (default 10,000); the oldest are dropped first."""


class Reviews(Protocol):
    """Where SubjectAccessReviews go (:meth:`opkeeper.kube.Client.create`)."""

    async def create(
        self, resource: kube.Resource, body: dict[str, Any], *, namespace: str | None = None
    ) -> dict[str, Any]: ...


_Key = tuple[frontproxy.User, str, Check]


class Authorizer:
    """Answers "may this user do that in this namespace", from the cache or a review."""

    def __init__(
        self,
        *,
        reviews: Reviews,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reviews = reviews
        self._settings = settings
        self._clock = clock
        self._decisions: collections.OrderedDict[_Key, tuple[bool, float]] = (
            collections.OrderedDict()
        )
        self._pending: dict[_Key, asyncio.Future[bool]] = {}
        self.reviews_sent = 0
        """SubjectAccessReviews sent so far (tests and the benchmark read it)."""

    async def require(
        self, *, user: frontproxy.User, namespace: str, method: str, needed: Sequence[Check]
    ) -> None:
        """Return if every check is allowed; raise :class:`Denied` for the first that is
        not, :class:`errors.Unavailable` when the API server cannot answer."""
        for check in needed:
            if not await self.allowed(user=user, namespace=namespace, check=check):
                raise Denied(user=user, namespace=namespace, check=check, method=method)

    async def allowed(self, *, user: frontproxy.User, namespace: str, check: Check) -> bool:
        key = (user, namespace, check)
        kept = self._decisions.get(key)
        if kept is not None and kept[1] > self._clock():
            return kept[0]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            decision = await self._ask(user=user, namespace=namespace, check=check)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a failure nobody else awaited is not logged
            raise
        finally:
            del self._pending[key]
        future.set_result(decision)
        self._remember(key, decision)
        return decision

    async def _ask(self, *, user: frontproxy.User, namespace: str, check: Check) -> bool:
        self.reviews_sent += 1
        try:
            answer = await self._reviews.create(
                SUBJECT_ACCESS_REVIEWS, review(user=user, namespace=namespace, check=check)
            )
        except (errors.Unauthenticated, errors.Forbidden) as exc:
            # The gateway's own account may not create reviews (no system:auth-delegator).
            raise errors.Unavailable(
                f"the gateway may not ask the API server for SubjectAccessReviews: {exc}"
            ) from exc
        return bool((answer.get("status") or {}).get("allowed"))

    def _remember(self, key: _Key, decision: bool) -> None:
        ttl = self._settings.allowed_ttl_seconds if decision else self._settings.denied_ttl_seconds
        self._decisions[key] = (decision, self._clock() + ttl)
        self._decisions.move_to_end(key)
        while len(self._decisions) > self._settings.max_entries:
            self._decisions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._decisions)
