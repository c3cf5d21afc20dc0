"""Several engines behind one gateway: which serve which model, which are healthy, which to use.

Task tree (the pool's nursery is opened by ``serve``, beside the registry's)::

    EnginePool.run                 the pool's nursery (only with two engines or more)
    ├── EnginePool._probe_loop × E   one per engine: GET /v1/models every --probe-interval
    └── EnginePool._metrics_loop × E one per engine that publishes Prometheus /metrics

Capacity lives in two places. Each model has one :class:`~trioai.admission.Admission` (its queue
and ``queued`` positions) whose capacity is the sum of ``max_concurrency`` over that model's healthy
engines; each engine counts its own requests in flight and never takes more than its
``max_concurrency``. Routing (:func:`choose`) picks, among the engines of the request's model that
have room, the least loaded (in flight, or what the engine's own ``/metrics`` say it runs and queues,
over its capacity), ties broken by weight; a connection's requests stay on the engine that served it
last while its load is within :data:`LOCALITY_SLACK` of the best (prefix-cache locality).

Health: an engine is ejected after ``--eject-after-failures`` consecutive failures (refused
connections, 5xx, broken or stalled streams) or one failed probe, and gets no traffic until a probe
passes; the first probe back waits 1 s, doubling with each ejection in a row up to 30 s (a circuit
breaker). When every engine of a model is ejected, all of them are tried anyway (a request might
pass; refusing it for sure would not help anyone).

With one engine (the common case, and the embedded one) there is nowhere else to send a request:
no probes or metrics reads run, and readiness asks the engine directly, as before.

With shared state (``--redis``, :meth:`EnginePool.share_admission`), both bounds hold across
instances (:mod:`trioai.clusteradmission`): each admission is a :class:`ClusterAdmission` (a slot
of a cluster pool and its queue, then the local slot), and an engine that the admission does not
bound alone (it serves several models, or its model has several engines) also has a cluster slot
per request, taken by :meth:`EnginePool.engine_for`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from .admission import Admission
from .clusteradmission import Cluster, ClusterAdmission
from .config import Settings
from .enginespec import EngineSpec
from .errors import ErrorCode, UpstreamError
from .protocol import ModelInfo
from .singleflight import SharedCall
from .transport import H11Transport
from .upstream import Upstream

log = logging.getLogger("trioai.engines")

#: A connection's last engine keeps its requests while its load is at most this much above the best.
LOCALITY_SLACK: Final = 0.125
FIRST_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 30.0
#: How long a failed model listing is shared before the engine is asked again.
DISCOVERY_RETRY: Final = 2.0
#: Above this KV-cache use an engine is about to preempt requests: count it as one capacity fuller.
KV_CACHE_FULL: Final = 0.98
METRICS_BYTES: Final = 4 << 20
#: With shared state: first wait (seconds, then doubling) before asking again for a full engine's cluster slot.
CLUSTER_ROOM_POLL: Final = 0.05
#: Failures that say the engine (not the request) is in trouble: they count towards ejection.
ENGINE_FAULTS: Final = frozenset({ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.UPSTREAM_DISCONNECTED,
                                  ErrorCode.UPSTREAM_TIMEOUT})


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine's own ``/metrics`` said it runs, queues and holds in its KV cache (0..1)."""

    running: float
    waiting: float
    kv_cache: float


def parse_engine_metrics(text: str) -> EngineLoad | None:
    """vLLM's ``num_requests_running``/``waiting`` (summed over label sets) and ``kv_cache_usage_perc``
    (the highest) from Prometheus text; None when the text has none of them (not a vLLM)."""
    wanted = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0, "vllm:kv_cache_usage_perc": 0.0}
    found = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and math.isfinite(sample.value):
                    if sample.name == "vllm:kv_cache_usage_perc":  # a share: the fullest (data-parallel) rank counts
                        wanted[sample.name] = max(wanted[sample.name], sample.value)
                    else:
                        wanted[sample.name] += sample.value
                    found = True
    except ValueError:
        return None
    if not found:
        return None
    return EngineLoad(wanted["vllm:num_requests_running"], wanted["vllm:num_requests_waiting"],
                      wanted["vllm:kv_cache_usage_perc"])


def is_engine_fault(exc: UpstreamError) -> bool:
    """Whether a failure counts against the engine's health (not 4xx, not 429: it is alive)."""
    if exc.code in ENGINE_FAULTS:
        return True
    return exc.code == ErrorCode.UPSTREAM_ERROR and (exc.status is None or exc.status >= 500)


class Engine:
    """One engine: its client, the models it serves, its health and what it runs now."""

    __slots__ = ("spec", "name", "upstream", "capacity", "weight", "models", "discovered", "in_flight",
                 "healthy", "failures", "ejections", "probe_after", "reported", "wake", "_discovery")

    def __init__(self, spec: EngineSpec, upstream: Upstream) -> None:
        self.spec = spec
        self.name = spec.name
        self.upstream = upstream
        self.capacity = spec.max_concurrency or 1
        self.weight = spec.weight
        self.models: tuple[str, ...] = spec.models or ()
        self.discovered = spec.models is not None
        self.in_flight = 0
        self.healthy = True
        self.failures = 0  # in a row
        self.ejections = 0  # in a row, for the backoff
        self.probe_after = 0.0
        self.reported: EngineLoad | None = None
        self.wake = trio.Event()  # set when ejected: the probe loop re-plans
        self._discovery = SharedCall(self._list_models, error_ttl=DISCOVERY_RETRY)

    @property
    def load(self) -> float:
        """Requests running or waiting on the engine, over its capacity (what routing compares)."""
        reported = self.reported
        if reported is None:
            return self.in_flight / self.capacity
        busy = max(float(self.in_flight), reported.running + reported.waiting)  # ours are among them
        return busy / self.capacity + (1.0 if reported.kv_cache >= KV_CACHE_FULL else 0.0)

    @property
    def has_room(self) -> bool:
        """Whether it may take one more request (its own ``max_concurrency``)."""
        return self.in_flight < self.capacity

    async def discover(self) -> tuple[str, ...]:
        """Its models: configured, or listed by the engine (one listing in flight, shared)."""
        if self.discovered:
            return self.models
        return await self._discovery.get()

    async def _list_models(self) -> tuple[str, ...]:
        models = tuple(await self.upstream.list_models())
        if not self.discovered:
            self.models, self.discovered = models, True
        return self.models

    def succeeded(self) -> None:
        """A request went through: the failure streak ends."""
        self.failures = 0

    def failed(self, now: float, eject_after: int) -> bool:
        """One more failure in a row; True when it ejected the engine."""
        self.failures += 1
        if self.healthy and self.failures >= eject_after:
            self.eject(now)
            return True
        return False

    def eject(self, now: float) -> None:
        """No traffic until a probe passes, which is not tried before the backoff."""
        self.healthy = False
        self.ejections += 1
        self.probe_after = now + min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(self.ejections - 1, 16))
        self.wake.set()

    def restore(self) -> None:
        """A probe passed: traffic again."""
        self.healthy = True
        self.failures = 0


def choose(engines: Sequence[Engine], prefer: str | None = None, avoid: Collection[str] = ()) -> Engine | None:
    """The engine for the next request among ``engines`` (those of its model), or None if none has room.

    Healthy engines not in ``avoid`` (tried already) first, then healthy ones, then, if the model
    has no healthy engine at all, any. Least :attr:`Engine.load` wins, then the higher weight; the
    ``prefer``-red engine wins while its load is within :data:`LOCALITY_SLACK` of the best.
    """
    best = _least_loaded(e for e in engines if e.healthy and e.has_room and e.name not in avoid)
    if best is None:
        best = _least_loaded(e for e in engines if e.healthy and e.has_room)
    if best is None and not any(e.healthy for e in engines):
        best = _least_loaded(e for e in engines if e.has_room)
    if best is None or prefer is None or best.name == prefer:
        return best
    for engine in engines:
        if (engine.name == prefer and engine.has_room and (engine.healthy or not best.healthy)
                and engine.name not in avoid and engine.load <= best.load + LOCALITY_SLACK):
            return engine
    return best


def _least_loaded(engines: Iterable[Engine]) -> Engine | None:
    best: Engine | None = None
    best_load = 0.0
    for engine in engines:
        load = engine.load
        if best is None or load < best_load or (load == best_load and engine.weight > best.weight):
            best, best_load = engine, load
    return best


class EnginePool:
    """Every engine of one gateway, the models they serve, admission per model, and health."""

    def __init__(self, engines: Sequence[Engine], settings: Settings) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = tuple(engines)
        self.settings = settings
        self.single = len(engines) == 1
        self.default_model = settings.model
        self._serving: dict[str, list[Engine]] = {}
        self._admissions: dict[str, Admission] = {}
        # One engine: every model shares its one queue (its capacity is the only limit).
        self._shared = Admission(self.engines[0].capacity) if self.single else None
        self._room = trio.lowlevel.ParkingLot()
        self._first_model = SharedCall(self._default_from_first_engine, error_ttl=DISCOVERY_RETRY)
        self.failovers = 0
        self.cluster: Cluster | None = None  # with shared state: admission across instances
        self._index()

    def share_admission(self, cluster: Cluster) -> None:
        """Admit across instances through ``cluster`` from now on (call before requests arrive)."""
        self.cluster = cluster
        if self._shared is not None:
            self._shared = ClusterAdmission(self.engines[0].capacity, cluster, f"engine:{self.engines[0].name}")
        self._admissions.clear()
        for model in self._serving:
            self._resize(model)

    @classmethod
    def single_engine(cls, settings: Settings, upstream: Upstream, name: str | None = None) -> EnginePool:
        """A pool of one engine (``serve`` with one upstream URL; tests)."""
        from .enginespec import default_name

        spec = EngineSpec(upstream.base_url, name or default_name(upstream.base_url),
                          max_concurrency=settings.max_concurrency)
        return cls([Engine(spec, upstream)], settings)

    # --- models -----------------------------------------------------------------------------

    def _index(self) -> None:
        serving: dict[str, list[Engine]] = {}
        for engine in self.engines:
            for model in engine.models:
                serving.setdefault(model, []).append(engine)
        if self.single and self.default_model is not None:
            serving.setdefault(self.default_model, [self.engines[0]])
        self._serving = serving
        for model in serving:
            self._resize(model)

    def _resize(self, model: str) -> None:
        """A model's admission capacity: its healthy engines' (all of them when none is healthy)."""
        if self._shared is not None:
            return
        engines = self._serving.get(model, ())
        healthy = [e for e in engines if e.healthy] or engines
        capacity = max(1, sum(e.capacity for e in healthy))
        admission = self._admissions.get(model)
        if admission is None:
            if self.cluster is None:
                self._admissions[model] = Admission(capacity)
            else:
                self._admissions[model] = ClusterAdmission(capacity, self.cluster, f"model:{model}")
        elif admission.limiter.total_tokens != capacity:
            admission.limiter.total_tokens = capacity

    def health_changed(self, engine: Engine) -> None:
        """Re-size the admission of every model of ``engine`` and let waiters look again."""
        for model in engine.models:
            self._resize(model)
        self._room.unpark_all()

    @property
    def models(self) -> list[str]:
        """Every model some engine serves, in configuration order."""
        return list(self._serving)

    async def resolve(self, model: str | None) -> str:
        """The model a request runs on: its own (checked), or the default.

        Raises ``model_not_found`` (naming the served models) for a model no engine serves, or the
        engine's error when the default has to be asked of the one engine and it cannot answer.
        """
        if model is None:
            if self.default_model is not None:
                model = self.default_model
            else:
                return await self._first_model.get()
        if model in self._serving:
            return model
        undiscovered = [e for e in self.engines if not e.discovered]
        if undiscovered:
            await self._discover(undiscovered)
            if model in self._serving:
                return model
        served = ", ".join(self.models) or "none (no engine listed its models)"
        raise UpstreamError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not served here; served models: {served}",
                            param="model")

    def known_model(self, model: str | None) -> str | None:
        """What :meth:`resolve` would answer without asking an engine anything; None when it would
        have to ask (an engine not yet discovered, no default yet) or refuse the model."""
        if model is None:
            return self.default_model
        return model if model in self._serving else None

    async def _default_from_first_engine(self) -> str:
        """The first model of the first engine (in configuration order) that lists one."""
        await self._discover([e for e in self.engines if not e.discovered])
        for engine in self.engines:
            if engine.models:
                self.default_model = engine.models[0]
                log.info("using model %s (first listed by engine %s)", self.default_model, engine.name)
                return self.default_model
        if self.single:
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine lists no models")
        raise UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, "no engine has listed its models yet", retryable=True)

    async def _discover(self, engines: Sequence[Engine]) -> None:
        """Ask each engine for its models at once; one that cannot answer is left for its probe."""
        if self.single:  # its error is the request's (no exception group around it)
            await self.engines[0].discover()
            self._index()
            return

        async def one(engine: Engine) -> None:
            try:
                await engine.discover()
            except UpstreamError as exc:
                log.warning("engine %s did not list its models: %s", engine.name, exc.message)

        async with trio.open_nursery() as nursery:
            for engine in engines:
                nursery.start_soon(one, engine)
        self._index()

    async def listing(self) -> tuple[ModelInfo, ...]:
        """Every served model with its engines and whether one of them is healthy (``models``)."""
        undiscovered = [e for e in self.engines if not e.discovered]
        if undiscovered:
            # The receive loop waits for this answer: an engine that does not answer soon is left out.
            with trio.move_on_after(self.settings.probe_timeout), contextlib.suppress(UpstreamError):
                await self._discover(undiscovered)
        return tuple(ModelInfo(model, tuple(e.name for e in engines), any(e.healthy for e in engines))
                     for model, engines in self._serving.items())

    # --- admission and routing ------------------------------------------------------------

    def admission(self, model: str) -> Admission:
        """The queue of ``model`` (one engine: the one queue)."""
        if self._shared is not None:
            return self._shared
        admission = self._admissions.get(model)
        if admission is None:
            self._resize(model)
            admission = self._admissions[model]
        return admission

    @property
    def admissions(self) -> list[Admission]:
        """Every queue (for the running and queued gauges)."""
        return [self._shared] if self._shared is not None else list(self._admissions.values())

    @asynccontextmanager
    async def engine_for(self, model: str, prefer: str | None = None, avoid: Collection[str] = (),
                         usable: Callable[[Engine], bool] | None = None) -> AsyncIterator[Engine]:
        """Hold room on an engine of ``model`` (see :func:`choose`), one ``usable`` says may take it,
        for the body.

        The model's admission slot is taken first, so there is room on some engine; only an
        engine serving several models can be full meanwhile, and then this waits for room. With
        shared state, the engine's cluster slot too, when the admission does not bound it alone.
        """
        engines = self._serving.get(model) or list(self.engines)
        if usable is not None:
            engines = [e for e in engines if usable(e)]
        if self.cluster is not None and not self.single and self._needs_engine_slots(model):
            async with self._cluster_engine(self.cluster, engines, prefer, avoid) as held:
                yield held
            return
        while True:
            engine = choose(engines, prefer, avoid)
            if engine is not None:
                break
            await self._room.park()
        engine.in_flight += 1
        try:
            yield engine
        finally:
            self.leave(engine)

    def engine_now(self, model: str, prefer: str | None = None) -> Engine | None:
        """Room on an engine of ``model`` taken now, as :meth:`engine_for` would (give it back with
        :meth:`leave`); None when it would have to wait, or take a cluster slot first."""
        if self.cluster is not None and not self.single and self._needs_engine_slots(model):
            return None
        engine = choose(self._serving.get(model) or self.engines, prefer, ())
        if engine is not None:
            engine.in_flight += 1
        return engine

    def leave(self, engine: Engine) -> None:
        """A request no longer holds the room it took on ``engine``: waiters for room look again."""
        engine.in_flight -= 1
        if self._room:
            self._room.unpark_all()

    def _needs_engine_slots(self, model: str) -> bool:
        """Whether a cluster slot of the engine is needed besides the model's: unless the model has
        one engine and that engine serves no other model."""
        serving = self._serving.get(model, ())
        return not (len(serving) == 1 and serving[0].models == (model,))

    @asynccontextmanager
    async def _cluster_engine(self, cluster: Cluster, engines: Sequence[Engine], prefer: str | None,
                              avoid: Collection[str]) -> AsyncIterator[Engine]:
        """:meth:`engine_for` holding a cluster slot of the engine (``engine:{name}``) as well."""
        full: set[str] = set()  # engines whose cluster slots were all taken when last asked
        delay = CLUSTER_ROOM_POLL
        while True:
            engine = choose([e for e in engines if e.name not in full], prefer, avoid)
            if engine is None:
                # No room here, or none in the cluster: look again when a local request ends, or soon.
                with trio.move_on_after(delay if full else cluster.lease / 4):
                    await self._room.park()
                if full:
                    delay = min(delay * 2, cluster.lease / 4)
                full.clear()
                continue
            engine.in_flight += 1  # before the round trip: no other request of this instance takes it meanwhile
            pool = f"engine:{engine.name}"
            taken = False
            try:
                taken, holder = await cluster.take(pool, engine.capacity)
            finally:
                if not taken:
                    self.leave(engine)
            if taken:
                break
            full.add(engine.name)
        try:
            yield engine
        finally:
            try:
                if holder is not None:
                    await cluster.release(pool, holder)
            finally:
                self.leave(engine)  # after the release: woken waiters find the cluster slot free

    def alternative(self, model: str, avoid: Collection[str],
                    usable: Callable[[Engine], bool] | None = None) -> Engine | None:
        """A healthy engine of ``model`` not in ``avoid`` (and ``usable``) with room, if there is one."""
        engines = [e for e in self._serving.get(model, ()) if e.healthy and e.name not in avoid
                   and (usable is None or usable(e))]
        return choose(engines)

    def record(self, engine: Engine, exc: UpstreamError | None) -> None:
        """Count a request's outcome towards the engine's health (passive ejection)."""
        if exc is None:
            engine.succeeded()
            return
        if not is_engine_fault(exc) or self.single:
            return
        if engine.failed(trio.current_time(), self.settings.eject_after_failures):
            log.warning("engine %s ejected after %d failures in a row (last: %s); probing it again in %.0f s",
                        engine.name, engine.failures, exc.message, engine.probe_after - trio.current_time())
            self.health_changed(engine)

    # --- health -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe every engine and read the metrics of those that publish them, until cancelled."""
        async with trio.open_nursery() as nursery:
            if not self.single:
                for engine in self.engines:
                    nursery.start_soon(self._probe_loop, engine)
                    if self.settings.engine_metrics_interval > 0 and engine.spec.metrics is not False:
                        nursery.start_soon(self._metrics_loop, engine)
            task_status.started()
            await trio.sleep_forever()

    async def probe(self, engine: Engine) -> bool:
        """Ask one engine for its models now; update its health and models; True if it answered."""
        models: list[str] | None = None
        with trio.move_on_after(self.settings.probe_timeout):
            try:
                models = await engine.upstream.list_models()
            except UpstreamError as exc:
                log.debug("probe of %s failed: %s", engine.name, exc.message)
        now = trio.current_time()
        if models is None:
            if engine.healthy and not self.single:
                engine.eject(now)
                log.warning("engine %s ejected: its health probe failed; probing it again in %.0f s", engine.name,
                            engine.probe_after - now)
                self.health_changed(engine)
            return False
        if not engine.discovered:
            engine.models, engine.discovered = tuple(models), True
            self._index()
        if engine.healthy:
            if not engine.failures:
                engine.ejections = 0  # a healthy probe with no failure since: the backoff starts over
        elif now >= engine.probe_after:
            engine.restore()
            log.info("engine %s is back: its health probe passed", engine.name)
            self.health_changed(engine)
        return True

    async def _probe_loop(self, engine: Engine) -> None:
        while True:
            await self.probe(engine)
            delay = self.settings.probe_interval
            if not engine.healthy:
                delay = max(0.0, engine.probe_after - trio.current_time())
            engine.wake = trio.Event()
            with trio.move_on_after(delay):
                await engine.wake.wait()

    async def _metrics_loop(self, engine: Engine) -> None:
        url = metrics_url(engine.upstream.base_url)
        timeout = httpx.Timeout(self.settings.probe_timeout)
        headers = {"authorization": f"Bearer {engine.spec.api_key}"} if engine.spec.api_key else {}
        async with httpx.AsyncClient(timeout=timeout, trust_env=False, headers=headers,
                                     transport=H11Transport(max_connections=1)) as client:
            while True:
                load: EngineLoad | None = None
                status = None
                try:
                    with trio.fail_after(self.settings.probe_timeout * 2):
                        response = await client.get(url)
                    status = response.status_code
                    if status == 200 and len(response.content) <= METRICS_BYTES:
                        load = parse_engine_metrics(response.text)
                except (httpx.HTTPError, trio.TooSlowError, UnicodeDecodeError):
                    pass  # down or slow: the probe deals with that; the last reading is dropped
                engine.reported = load
                if load is None and engine.spec.metrics is None and status in (200, 404):
                    log.info("engine %s publishes no vLLM metrics: routing counts its requests only", engine.name)
                    return
                await trio.sleep(self.settings.engine_metrics_interval)

    async def check_ready(self) -> tuple[bool, str]:
        """Probe every engine now; ready while every model has a healthy engine. Also the why."""
        answered: set[Engine] = set()

        async def one(engine: Engine) -> None:
            if await self.probe(engine):
                answered.add(engine)

        async with trio.open_nursery() as nursery:
            for engine in self.engines:
                nursery.start_soon(one, engine)
        if self.single:  # a failed probe does not eject the one engine (nowhere else to go)
            return (True, "ready\n") if answered else (False, "upstream not answering\n")
        missing = [model for model, engines in self._serving.items() if not any(e.healthy for e in engines)]
        unknown = [e.name for e in self.engines if not e.discovered]
        if not self._serving:
            return False, "no engine has listed its models yet\n"
        if missing:
            return False, "".join(f"model {model}: no healthy engine\n" for model in missing)
        return True, "ready\n" + "".join(f"engine {name}: not answering\n" for name in unknown)

    # --- accounting -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests holding capacity, all models."""
        return sum(a.running for a in self.admissions)

    @property
    def queued(self) -> int:
        """Requests waiting for capacity, all models."""
        return sum(a.queued for a in self.admissions)


def metrics_url(base_url: str) -> str:
    """``/metrics`` at the root of a ``…/v1`` base URL, where vLLM serves it."""
    root = base_url[:-3] if base_url.endswith("/v1") else base_url
    return root.rstrip("/") + "/metrics"


class EngineMetrics:
    """Per-engine Prometheus metrics (label ``engine``), read from the pool at scrape time."""

    def __init__(self, pool: EnginePool, registry: CollectorRegistry) -> None:
        self.pool = pool
        self.requests = Counter("trioai_engine_requests", "Requests sent to each engine, by outcome (ok, failed)",
                                ["engine", "outcome"], registry=registry)
        self.ejections = Counter("trioai_engine_ejections", "Times each engine was ejected", ["engine"],
                                 registry=registry)
        self.failovers = Counter("trioai_failovers", "Requests moved to another engine: before the first token "
                                 "(retry) or mid-answer (continuation)", ["kind"], registry=registry)
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        """The current-state gauges, one sample per engine."""
        healthy = GaugeMetricFamily("trioai_engine_healthy", "1 while the engine takes traffic", labels=["engine"])
        in_flight = GaugeMetricFamily("trioai_engine_in_flight", "Requests running on the engine", labels=["engine"])
        load = GaugeMetricFamily("trioai_engine_load", "What routing compares: requests running or waiting on the "
                                 "engine over its capacity", labels=["engine"])
        for engine in self.pool.engines:
            healthy.add_metric([engine.name], float(engine.healthy))
            in_flight.add_metric([engine.name], float(engine.in_flight))
            load.add_metric([engine.name], engine.load)
        return [healthy, in_flight, load]

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe ahead of a scrape (the registry then calls collect once to learn names)."""
        return []
