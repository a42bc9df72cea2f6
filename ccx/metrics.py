"""Prometheus metrics for operators: what `GET /metrics` exposes (token-protected).

Inputs: the live state of one server (its manager's sessions and counters, its connections),
read at scrape time, and control latencies observed by the API layer.
Outputs: `Metrics.render()`, the Prometheus text exposition format (version 0.0.4).
Each `Metrics` has its own `CollectorRegistry`: no process-global state, so several servers
(tests, `ccx selftest`) in one process never mix their numbers.
Docs: https://prometheus.github.io/client_python/collector/custom/
      https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sized

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = ("running", "paused", "cancelling", "exited", "killed", "cancelled", "timeout")
# Control is SIGSTOP/SIGCONT/SIGTERM plus, for PAUSE, waiting until the group is seen stopped:
# sub-millisecond to tens of milliseconds.
CONTROL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _StateCollector(Collector):
    """Gauges and counters computed from the server's state at each scrape."""

    def __init__(self, source: Callable[[], ServerState]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        state = self._source()
        sessions = GaugeMetricFamily("ccx_sessions", "Sessions known to the server, by status.",
                                     labels=["status"])
        counts = collections.Counter(state.statuses)
        for status in sorted(set(STATUSES) | set(counts)):
            sessions.add_metric([status], counts.get(status, 0))
        yield sessions
        yield GaugeMetricFamily("ccx_connections", "Open WebSocket connections.",
                                value=state.connections)
        yield CounterMetricFamily("ccx_sessions_started", "Sessions started.",
                                  value=state.started_total)
        yield CounterMetricFamily("ccx_spawn_failures",
                                  "execute calls whose process could not start.",
                                  value=state.spawn_failures_total)
        streamed = CounterMetricFamily("ccx_output_bytes",
                                       "Bytes read from children's output, by stream.",
                                       labels=["stream"])
        for stream, value in sorted(state.output_bytes.items()):
            streamed.add_metric([stream], value)
        yield streamed
        yield GaugeMetricFamily("ccx_held_bytes",
                                "Bytes of output held in memory by all sessions (encoded, as "
                                "kept), counted against CCX_MAX_HELD_BYTES.",
                                value=state.held_bytes)
        yield GaugeMetricFamily("ccx_held_bytes_limit", "CCX_MAX_HELD_BYTES.",
                                value=state.held_limit)
        yield GaugeMetricFamily("ccx_input_pending_bytes",
                                "Bytes of input frames read from clients and not yet written "
                                "to children, all connections (CCX_MAX_INPUT_BYTES each).",
                                value=state.input_pending)
        yield GaugeMetricFamily("ccx_spool_bytes",
                                "Bytes of held output in spool files on disk (CCX_SPOOL_DIR), "
                                "all sessions and SSE streams; not counted in ccx_held_bytes.",
                                value=state.spool_bytes)


class ServerState:
    """A snapshot of what the collector reports (filled by the server at scrape time)."""

    def __init__(self, statuses: list[str], connections: Sized, started_total: int,
                 spawn_failures_total: int, output_bytes: dict[str, int], *,
                 held_bytes: int = 0, held_limit: int = 0, input_pending: int = 0,
                 spool_bytes: int = 0) -> None:
        self.statuses = statuses
        self.connections = len(connections)
        self.started_total = started_total
        self.spawn_failures_total = spawn_failures_total
        self.output_bytes = output_bytes
        self.held_bytes = held_bytes
        self.held_limit = held_limit
        self.input_pending = input_pending
        self.spool_bytes = spool_bytes


class Metrics:
    """One server's registry: state read on demand plus a control latency histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.control_latency = Histogram(
            "ccx_control_latency_seconds",
            "Time to answer a control request (PAUSE includes waiting for the group to stop).",
            ["type"], buckets=CONTROL_BUCKETS, registry=self.registry)

    def watch(self, source: Callable[[], ServerState]) -> None:
        """Report *source()* at every scrape."""
        self.registry.register(_StateCollector(source))

    def observe_control(self, kind: str, seconds: float) -> None:
        self.control_latency.labels(kind).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _self_check() -> None:
    metrics = Metrics()
    metrics.watch(lambda: ServerState(["running", "exited", "exited"], {1, 2}, 3, 1,
                                      {"stdout": 10, "stderr": 2}, held_bytes=7,
                                      spool_bytes=9))
    metrics.observe_control("PAUSE", 0.002)
    text = metrics.render().decode()
    for line in ('ccx_sessions{status="exited"} 2.0', 'ccx_sessions{status="paused"} 0.0',
                 "ccx_connections 2.0", "ccx_sessions_started_total 3.0",
                 "ccx_spawn_failures_total 1.0", "ccx_held_bytes 7.0", "ccx_spool_bytes 9.0",
                 'ccx_output_bytes_total{stream="stdout"} 10.0',
                 'ccx_control_latency_seconds_bucket{le="0.0025",type="PAUSE"} 1.0'):
        assert line in text.splitlines(), (line, text)
    print("ccx.metrics: PASS")


if __name__ == "__main__":
    _self_check()
