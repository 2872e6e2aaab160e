"""Prometheus metrics of the controller.

Counted where the decision is made (the reconciler), so the numbers are the
controller's own view: transitions, attempt durations by type and outcome,
operations per state (read from the in-memory cache at scrape time, so the
gauge costs nothing between scrapes), and API writes by verb and resource
(from :class:`opkeeper.kube.Client`), which is what the write budget is about.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TRANSITIONS = prometheus_client.Counter(
    "opkeeper_operation_transitions_total",
    "Operation state transitions, by source and target state.",
    ["from_state", "to_state"],
)
DURATION = prometheus_client.Histogram(
    "opkeeper_operation_duration_seconds",
    "Time from an attempt being queued to its end, by operation type and final state.",
    ["type", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
)
TIME_IN_STATE = prometheus_client.Histogram(
    "opkeeper_operation_state_seconds",
    "Time an operation spent in a state before leaving it (WaitingExternal: the time"
    " spent waiting on an external system), as the controller saw it enter and leave.",
    ["state"],
    buckets=(0.1, 1, 5, 30, 60, 300, 900, 3600, 14400, 86400, 604800),
)
RECONCILES = prometheus_client.Counter(
    "opkeeper_reconciles_total", "Reconcile runs, by result.", ["result"]
)


class StateCollector(Collector):
    """``opkeeper_operations{state}``, ``opkeeper_operation_oldest_seconds{state}``,
    ``opkeeper_api_writes_total`` and ``opkeeper_api_retries_total`` at scrape time."""

    def __init__(
        self,
        *,
        states: Callable[[], Mapping[str, int]],
        oldest: Callable[[], Mapping[str, float]],
        writes: Callable[[], Mapping[tuple[str, str], int]],
        retries: Callable[[], Mapping[str, int]],
    ) -> None:
        self._states = states
        self._oldest = oldest
        self._writes = writes
        self._retries = retries

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauge = GaugeMetricFamily(
            "opkeeper_operations",
            "Operations known to the controller, by state.",
            labels=["state"],
        )
        for state, count in sorted(self._states().items()):
            gauge.add_metric([state], count)
        yield gauge
        oldest = GaugeMetricFamily(
            "opkeeper_operation_oldest_seconds",
            "Per unfinished state, how long the operation longest in it has been there.",
            labels=["state"],
        )
        for state, seconds in sorted(self._oldest().items()):
            oldest.add_metric([state], seconds)
        yield oldest
        counter = CounterMetricFamily(
            "opkeeper_api_writes",
            "Writes the controller made to the API server.",
            labels=["verb", "resource"],
        )
        for (verb, resource), count in sorted(self._writes().items()):
            counter.add_metric([verb, resource], count)
        yield counter
        retried = CounterMetricFamily(
            "opkeeper_api_retries",
            "API server requests sent again, by cause: the HTTP status (429, 5xx, 401 after"
            " renewing credentials) or the connection error.",
            labels=["cause"],
        )
        for cause, count in sorted(self._retries().items()):
            retried.add_metric([cause], count)
        yield retried


def serve(*, port: int, address: str, collector: StateCollector) -> None:
    """Register ``collector`` and serve /metrics on ``address``:``port`` (port 0: do not
    serve)."""
    prometheus_client.REGISTRY.register(collector)
    if port:
        # A thread of its own: kopf cancels the asyncio tasks it did not start on exit.
        prometheus_client.start_http_server(port, addr=address)


def unserve(collector: StateCollector) -> None:
    """Unregister ``collector`` (the HTTP thread, if any, lives as long as the process)."""
    prometheus_client.REGISTRY.unregister(collector)
