"""The controller's settings, in one place, each with its unit and why it is what it is."""

from __future__ import annotations

import dataclasses

LEASE_DURATION_SECONDS = 15.0
"""controller-runtime's default ``LeaseDuration``."""
RENEW_DEADLINE_SECONDS = 10.0
"""controller-runtime's default ``RenewDeadline``."""
RETRY_PERIOD_SECONDS = 2.0
"""controller-runtime's default ``RetryPeriod``."""
LEASE_NAME = "opkeeper-controller"
"""The Lease the controller replicas compete for."""


METRICS_ADDRESS = "0.0.0.0"
"""The controller's default /metrics address: every interface (Prometheus scrapes the pod)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How the controller runs. The CLI fills it from flags; tests build it directly."""

    namespaces: tuple[str, ...] = ()
    """Namespaces (or kopf globs) to serve. Empty with ``all_namespaces`` False means
    the kubeconfig's current namespace is not assumed: the CLI requires one or the other."""
    all_namespaces: bool = False
    """Serve every namespace (cluster-wide watches; needs cluster-wide RBAC)."""
    system_namespace: str = "opkeeper-system"
    """Where the id counter ConfigMap lives (created if missing). The gateway must use
    the same one, or ids collide."""
    id_block_size: int = 100
    """Ids reserved per counter write. Larger: fewer writes; the rest of a block is
    skipped (never reused) when the process stops."""
    workers: int = 32
    """Concurrent reconciles (different operations). Bounded so a burst of creations
    queues in memory instead of opening thousands of connections."""
    standalone: bool = False
    """One controller only (tests and local runs): act at once, without leader election.
    Two standalone controllers on the same namespaces would both act."""
    lease_name: str = LEASE_NAME
    """The ``coordination.k8s.io/v1`` Lease of leader election."""
    lease_namespace: str = ""
    """Where the Lease lives; empty: ``system_namespace``. The chart uses the release's
    namespace (where the controller runs)."""
    lease_duration_seconds: float = LEASE_DURATION_SECONDS
    """How long, after a standby last saw the Lease renewed, it waits before taking it
    over (rounded up to whole seconds, as the Lease stores it). The takeover time after
    a leader's crash; a clean shutdown releases the Lease, so no wait then."""
    renew_deadline_seconds: float = RENEW_DEADLINE_SECONDS
    """How long the leader keeps acting without a renewal going through; it then stops
    reconciling and firing. Must be shorter than the lease duration: the margin is what
    the old leader has to stop before a standby may start."""
    retry_period_seconds: float = RETRY_PERIOD_SECONDS
    """Gap between renewals (the leader: one API write each) and between a standby's
    reads of the Lease. Idle cost: 60 / this many Lease writes per minute."""
    identity: str = ""
    """This replica's name in the Lease; empty: the pod name (``POD_NAME``, else the host
    name) and a random suffix."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    metrics_address: str = METRICS_ADDRESS
    """Address /metrics listens on (default every interface: Prometheus scrapes the pod's
    IP); ``make dev`` and the tests use 127.0.0.1."""
    post_events: bool = True
    """Post a Kubernetes Event on each transition. Each Event is an API write: the
    benchmark reports them separately."""
    event_qps: float = 10.0
    """Events posted per second at most, on average (a token bucket; beyond it they are
    dropped). Events are a courtesy: under a burst (56 ScheduledTask runs per second
    bring 168 Events per second) they must not take the API server's CPU from the
    writes that fire and finish runs. The kubelet's ``--event-qps`` does the same."""
    event_burst: int = 100
    """Events posted at once before ``event_qps`` applies: a quiet controller's Events
    (a few transitions a second) are never dropped."""
    coalesce_seconds: float = 2.0
    """Minimum gap, in seconds, between two controller writes to one operation that
    only carry progress or ``updatedAt`` (worker reports, sleep steps). Transitions are
    never delayed. This is what keeps a chatty worker from costing a write per report."""
    default_retry_backoff_seconds: int = 10
    """Delay before the first automatic retry when spec.retries.backoffSeconds is unset;
    doubled for each further retry."""
    webhook_initial_delay: float = 1.0
    """First delay, in seconds, before re-trying a failed webhook call or polling pollUrl."""
    webhook_max_delay: float = 60.0
    """Cap, in seconds, of the doubling webhook retry/poll delay."""
    webhook_allow: tuple[str, ...] = ()
    """Where webhooks may connect: host names and CIDRs (``--webhook-allow``). Empty:
    anywhere but loopback, link-local, unspecified and multicast addresses; non-empty:
    only a listed host name or addresses inside a listed CIDR, which may then also be
    loopback or link-local. The API server's own endpoint is refused either way: whoever
    may create an Operation chooses its URLs and reads the replies in its status."""
    error_max_delay: float = 60.0
    """Cap, in seconds, of the backoff after a failed reconcile (API server unavailable)."""
