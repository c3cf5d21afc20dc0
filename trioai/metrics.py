"""The server's Prometheus metrics, in a registry of its own (so several servers in one process, as in
the tests, never share counters).

Counters are updated once per request, when it ends, rather than once per token: the per-token path
stays free of locks. Gauges of current state are read from the live objects at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

TTFT_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS: Final = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Issue 19: the gateway's own share of a request's start and of each token's way through it. Request
# starts are ~100-200 µs when nothing waits: 25 µs steps there, so a p50 near 150 µs is read closely.
REQUEST_START_BUCKETS: Final = (0.000025, 0.00005, 0.0001, 0.000125, 0.00015, 0.000175, 0.0002, 0.00025, 0.0003,
                                0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RELAY_BUCKETS: Final = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                        0.1)


class UpstreamHooks(Protocol):
    """What :meth:`Metrics.watch_upstream` sets (``upstream.Upstream``'s hooks)."""

    on_request_start: Callable[[float], None] | None
    on_relay: Callable[[float], None] | None


class Metrics:
    """Counters, gauges and histograms of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge("trioai_connections_open", "Open WebSocket connections", registry=r)
        self.streams_running = Gauge("trioai_streams_running", "Generations running upstream", registry=r)
        self.streams_queued = Gauge("trioai_streams_queued", "Generations waiting for capacity", registry=r)
        self.draining = Gauge("trioai_draining", "1 while the server drains before exiting", registry=r)
        self.connections = Counter("trioai_connections", "WebSocket connections accepted", registry=r)
        self.handshakes_rejected = Counter(
            "trioai_handshakes_rejected", "Handshakes refused, by HTTP status (401, 403, 503)", ["status"], registry=r
        )
        self.requests = Counter(
            "trioai_requests",
            "Finished generations by outcome (done, cancelled, error, aborted, abandoned) and error code",
            ["outcome", "code"], registry=r,
        )
        self.tokens = Counter("trioai_tokens_relayed", "Content deltas relayed to clients", registry=r)
        self.cancels = Counter("trioai_cancels", "cancel events received from clients", registry=r)
        self.upstream_errors = Counter(
            "trioai_upstream_errors", "Generations ended by an engine failure, by error code", ["code"], registry=r
        )
        self.ttft = Histogram(
            "trioai_time_to_first_token_seconds", "From receiving a request to its first token (queueing included)",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.detached = Gauge("trioai_generations_detached", "Resumable generations running with no connection",
                              registry=r)
        self.log_bytes = Gauge("trioai_resume_log_bytes", "Bytes held in resumable generations' event logs",
                               registry=r)
        self.resumes = Counter("trioai_resumes", "Generations a connection attached to by 'resume'", registry=r)
        self.abandoned = Counter(
            "trioai_generations_abandoned", "Detached generations cancelled: window passed or memory cap", registry=r
        )
        self.shared_appends = Counter(
            "trioai_shared_log_appends", "Calls that appended frames of shared generations to the shared log "
            "(Redis round trips on the token path)", registry=r,
        )
        self.state_degraded = Gauge(
            "trioai_state_degraded", "1 while the shared state (--redis) is unavailable and local state is used",
            registry=r,
        )
        self.duration = Histogram(
            "trioai_request_duration_seconds", "From receiving a request to its terminal event",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.request_start = Histogram(
            "trioai_request_start_seconds",
            "From the session taking a request to its engine request written (first attempt; admission "
            "queueing included)", buckets=REQUEST_START_BUCKETS, registry=r,
        )
        self.relay = Histogram(
            "trioai_relay_seconds",
            "From engine bytes read to the client frame carrying them handed to the kernel (one engine read "
            "in upstream.RELAY_SAMPLE_EVERY)", buckets=RELAY_BUCKETS, registry=r,
        )

    def watch(
        self,
        *,
        connections_open: Callable[[], float],
        streams_running: Callable[[], float],
        streams_queued: Callable[[], float],
        draining: Callable[[], float],
    ) -> None:
        """Read the current-state gauges from these callables at each scrape."""
        self.connections_open.set_function(connections_open)
        self.streams_running.set_function(streams_running)
        self.streams_queued.set_function(streams_queued)
        self.draining.set_function(draining)

    def watch_upstream(self, upstream: UpstreamHooks) -> None:
        """Feed issue 19's histograms from an engine's client (its request-start and relay hooks)."""
        upstream.on_request_start = self.request_start.observe
        upstream.on_relay = self.relay.observe

    def request_finished(
        self, outcome: str, code: str | None, tokens: int, ttft_s: float | None, duration_s: float
    ) -> None:
        """Record one generation's end."""
        self.requests.labels(outcome, code or "").inc()
        if tokens:
            self.tokens.inc(tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.duration.observe(duration_s)
        if code is not None and code.startswith("upstream_"):
            self.upstream_errors.labels(code).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
