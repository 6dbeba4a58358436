"""The live state of a fleet (sans-IO, thread-safe): who is busy, who is down, who is next.

One :class:`FleetState` per client. The call layer asks :meth:`FleetState.choose` for
an endpoint, holds an :class:`AttemptTicket` while the request runs, and reports its
outcome on the ticket; the watcher thread feeds ``/metrics`` figures, ``/health`` probes
and DNS answers in. Every operation takes the one lock for a few microseconds and is
O(endpoints); no I/O and no clock of its own (``now`` is passed in).

Example::

    state = FleetState(fleet)
    pick = state.choose(now, session="conv-42")
    if isinstance(pick, float):
        ...  # every endpoint is saturated or down: wait pick seconds, or raise
    with state.started(pick, now) as ticket:
        ...  # send to pick.endpoint.url; ticket.first_token(t) / ticket.failed(t, counts=True)
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

from ._breaker import Breaker, BreakerState
from ._config import Secret
from ._fleet_config import MIN_TTFT_SAMPLES, CircuitBreaker, Endpoint, Fleet
from ._routing import affinity_holds, load_score, lowest, rendezvous, ttft_term, weighted_sample
from ._vllm_metrics import LoadReport

__all__ = ["AttemptTicket", "EndpointLoad", "EndpointState", "FleetState", "Pick"]

# Weight of the newest first-token time in an endpoint's moving average: about the
# last five calls matter, so a replica that slows down is noticed within a few calls.
_TTFT_ALPHA = 0.3
# Seconds over which a slow replica's penalty fades when it gets no calls.
_TTFT_MEMORY = 30.0
# The hedge budget's bucket: a few hedges may go at once after a quiet spell, no more.
_HEDGE_BURST = 3.0
# An endpoint's own first-token percentile counts toward the hedge delay from this many.
_MIN_ENDPOINT_SAMPLES = 5
# Rescues (requests lost to a hedge before a first token) an endpoint remembers.
_RESCUES_KEPT = 8
# The shortest wait choose() suggests, so that a caller polling it does not spin.
_MIN_WAIT = 0.05


@dataclass(frozen=True, slots=True)
class EndpointLoad:
    """What a client knows of one endpoint's load right now (a snapshot).

    ``in_flight`` counts this client's requests there; ``running``, ``waiting`` and
    ``kv_cache`` (a fraction) come from the server's ``/metrics`` (``None`` when never
    read), ``fresh`` says whether they are recent enough to be used, ``state`` is the
    circuit breaker's.

    Example::

        load = EndpointLoad("gpu-1:8000", "http://gpu-1:8000/v1", "Qwen/Qwen3-8B",
                            in_flight=3, running=12, waiting=0, kv_cache=0.41,
                            state="closed", fresh=True)
        print(load.name, load.in_flight, load.waiting, load.state)
    """

    name: str
    url: str
    model: str
    in_flight: int
    running: float | None
    waiting: float | None
    kv_cache: float | None
    state: BreakerState
    fresh: bool


class EndpointState:
    """One endpoint as the fleet sees it: its settings, counters, load and breaker.

    Read its fields freely (they are plain numbers); change them only through
    :class:`FleetState` and :class:`AttemptTicket`, which hold the lock.

    Example::

        pick.endpoint.url, pick.endpoint.model, pick.endpoint.api_key  # where to send
    """

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        tier: int,
        breaker: CircuitBreaker,
        *,
        discovered: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.url = endpoint.base_url
        self.model = model
        self.tier = tier
        """0 for the primary endpoints (listed or discovered), 1 for the fallback ones."""
        self.name = endpoint.label
        self.weight = endpoint.weight
        self.api_key = Secret(endpoint.api_key) if endpoint.api_key else None
        self.discovered = discovered
        self.draining = False
        """Gone from DNS: never chosen again, dropped when its last request ends."""
        self.in_flight = 0
        self.calls = 0
        """Attempts started here."""
        self.failures = 0
        """Attempts that failed here in a way that counts against the endpoint."""
        self.load: LoadReport | None = None
        self.load_at: float | None = None
        """When ``load`` was read (``None``: never)."""
        self.scraped_at: float | None = None
        """When ``/metrics`` was last asked, answered or not."""
        self.in_flight_at_load = 0
        self.breaker = Breaker(breaker)
        self.ttft_ewma: float | None = None
        self.ttft_at: float | None = None
        """When ``ttft_ewma`` last learned something (``None``: never)."""
        self.unanswered: set[AttemptTicket] = set()
        """Attempts in flight here that have had no first token yet."""
        self.answered_start: float | None = None
        """When the latest-sent attempt that got a first token here was sent."""
        self.answered_at: float | None = None
        """When a first token last arrived from here."""
        self.rescued: deque[tuple[float, float]] = deque(maxlen=_RESCUES_KEPT)
        """(sent, lost at) of the latest attempts here overtaken by their hedge, untouched."""

    def recovered(self) -> None:
        """Its circuit closed again: what it was like before it went down is forgotten.

        A replica back from an outage is usually a new process: its first-token times
        from before say nothing of it now.
        """
        self.ttft_ewma = None
        self.ttft_at = None
        self.rescued.clear()

    @property
    def key(self) -> str:
        """Identity in the fleet and in rendezvous hashing: base URL and model."""
        return f"{self.url} {self.model}"

    def __repr__(self) -> str:
        return (
            f"EndpointState({self.name!r}, model={self.model!r}, tier={self.tier}, "
            f"in_flight={self.in_flight})"
        )


class Pick(NamedTuple):
    """The endpoint :meth:`FleetState.choose` chose; ``trial``: it is half-open (one call).

    Example::

        pick = state.choose(now, session=None)
        if not isinstance(pick, float):
            print(pick.endpoint.name, pick.trial)
    """

    endpoint: EndpointState
    trial: bool


class AttemptTicket:
    """One request in flight on one endpoint: report its outcome, then release it.

    :meth:`release` is the only way the endpoint's in-flight count goes down, and it
    counts once however often it is called; use the ticket as a context manager so
    that errors and cancellations release it too. The first verdict (first token,
    failure, success) is the one the circuit breaker hears.

    Example::

        with state.started(pick, now) as ticket:
            ...  # on the first token: ticket.first_token(now)
            ...  # on a 503: ticket.failed(now, counts=True); on a 400: counts=False
    """

    __slots__ = (
        "_decided",
        "_first_token_at",
        "_late",
        "_released",
        "_state",
        "_trial",
        "endpoint",
        "started_at",
    )

    def __init__(
        self, state: FleetState, endpoint: EndpointState, trial: int | None, now: float
    ) -> None:
        self._state = state
        self.endpoint = endpoint
        self._trial = trial
        self._decided = False
        self._released = False
        self._first_token_at: float | None = None
        self._late = False
        self.started_at = now

    started_at: float
    """When the attempt started (``FleetState.started``'s ``now``)."""

    def late(self) -> None:
        """Its hedge is due (see :meth:`FleetState.hedge_at`), sent or not: it is late.

        Until its endpoint answers it or a request sent after it, routing takes the
        endpoint for stalled and sends new calls elsewhere.

        Example::

            ticket.late()
        """
        with self._state._lock:
            self._late = True

    @property
    def trial(self) -> bool:
        """Whether this attempt holds the half-open endpoint's one trial slot."""
        return self._trial is not None

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def first_token(self, now: float) -> None:
        """The first token arrived: record the first-token time; the endpoint works.

        Example::

            ticket.first_token(time.monotonic())
        """
        with self._state._lock:
            if self._first_token_at is not None:
                return
            self._first_token_at = now
            endpoint = self.endpoint
            endpoint.unanswered.discard(self)
            if endpoint.answered_start is None or self.started_at > endpoint.answered_start:
                endpoint.answered_start = self.started_at
            endpoint.answered_at = now
            self._decide(now, success=True)  # first: a recovery forgets the old times
            self._state._record_ttft(self.endpoint, now - self.started_at, now)

    def failed(self, now: float, *, counts: bool) -> None:
        """The attempt failed; ``counts=False`` when the caller is at fault (400, 401, ...).

        Failures after the first token do not count against the endpoint: it was serving.

        Example::

            ticket.failed(now, counts=True)    # connection refused, 503, no first token
            ticket.failed(now, counts=False)   # 422: the request was wrong, not the server
        """
        with self._state._lock:
            self.endpoint.unanswered.discard(self)
            if self._decided:
                return
            if counts:
                self.endpoint.failures += 1
                self._decide(now, success=False)
            else:
                self._decided = True

    def succeeded(self, now: float) -> None:
        """The attempt completed (an answer with no token at all still proves the server).

        Example::

            ticket.succeeded(now)
        """
        with self._state._lock:
            self._decide(now, success=True)

    def lost(self, now: float, *, overtaken: bool = True) -> None:
        """The attempt was cut by the call (another won a hedge race); no verdict on health.

        ``overtaken``: a request sent after it (its hedge) answered first. Without a
        first token by ``now``, the endpoint's first-token time is then at least the
        time it was given, and until the endpoint answers a request sent after this one,
        routing counts this one as still waiting there: routing learns that it is slow
        even when hedges rescue every call sent to it. A hedge cut because the request it
        backed answered first (``overtaken=False``) says nothing of its endpoint.

        Example::

            ticket.lost(time.monotonic())
            ticket.release()
        """
        with self._state._lock:
            endpoint = self.endpoint
            endpoint.unanswered.discard(self)
            if self._first_token_at is not None:
                return
            decided, self._decided = self._decided, True
            if not overtaken:
                return
            endpoint.rescued.append((self.started_at, now))
            if not decided:
                answered = endpoint.answered_start
                alone = answered is not None and answered > self.started_at
                self._state._record_no_first_token(
                    endpoint, now - self.started_at, now, whole=not alone
                )

    def release(self) -> None:
        """The attempt is over, whatever happened: in flight goes down, exactly once.

        Example::

            try:
                ...
            finally:
                ticket.release()
        """
        with self._state._lock:
            if self._released:
                return
            self._released = True
            endpoint = self.endpoint
            endpoint.in_flight -= 1
            endpoint.unanswered.discard(self)
            if self._trial is not None:
                endpoint.breaker.release_trial(self._trial)
            if endpoint.draining and endpoint.in_flight == 0:
                self._state._drop(endpoint)

    def _decide(self, now: float, *, success: bool) -> None:
        if self._decided:
            return
        self._decided = True
        breaker = self.endpoint.breaker
        if success:
            recovering = breaker.state(now) != "closed"
            breaker.succeeded(now)
            if recovering:
                self.endpoint.recovered()
        elif self._trial is not None or breaker.state(now) == "closed":
            # Only the trial speaks for a half-open endpoint: a request sent before it
            # opened says nothing about whether it recovered since.
            breaker.failed(now)

    def __enter__(self) -> AttemptTicket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FleetState:
    """The endpoints of one client's fleet, their load and health, and the choice among them.

    ``rng`` makes choices reproducible in tests; ``clock`` is the time base of every
    ``now`` passed in (used only by :meth:`loads` when given no ``now``).

    Example::

        state = FleetState(fleet, rng=random.Random(0))
        pick = state.choose(time.monotonic(), session="conv-42")
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self._lock = threading.Lock()
        self._rng = rng if rng is not None else random.Random()
        primary = [self._state_of(e, fleet.model_of(e), 0) for e in fleet.endpoints]
        fallback = [self._state_of(e, fleet.model_of(e), 1) for e in fleet.fallback]
        self._endpoints: list[EndpointState] = primary + fallback
        window = fleet.hedging.window if fleet.hedging is not None else 0
        # Per model, the last `window` first-token times, each with its endpoint.
        self._ttfts: dict[str, deque[tuple[EndpointState, float]]] = {}
        self._window = window
        budget = fleet.hedging.budget if fleet.hedging is not None else 0.0
        self._hedge_tokens = 0.0
        # Calls come in bursts and so do slow first tokens: a window's worth of the
        # budget may be spent at once, and over any run hedges stay within budget * calls
        # plus that burst.
        self._hedge_burst = max(_HEDGE_BURST, budget * window)
        if budget > 0:
            # Full at the start, as a token bucket is: a replica slow from the first
            # calls is what hedging is for, and those calls come in a burst.
            self._hedge_tokens = self._hedge_burst
        self.last_call_at: float | None = None
        """When a call last started or waited for room (``None``: never)."""
        self.on_wait: Callable[[], None] | None = None
        """Called when :meth:`choose` tells a call to wait: the client wakes its watcher,
        whose fresh figures are what can give the waiting call room."""
        self.calls = 0

    def _state_of(
        self, endpoint: Endpoint, model: str | None, tier: int, *, discovered: bool = False
    ) -> EndpointState:
        # Fleet validation guarantees a model for every endpoint of every tier.
        assert model is not None
        return EndpointState(endpoint, model, tier, self.fleet.breaker, discovered=discovered)

    @property
    def endpoints(self) -> list[EndpointState]:
        """A copy of the endpoint list: primary (listed, then discovered), then fallback.

        Example::

            [e.name for e in state.endpoints]
        """
        with self._lock:
            return list(self._endpoints)

    # -- choosing ----------------------------------------------------------------------

    def choose(
        self,
        now: float,
        *,
        session: str | None = None,
        tried: Collection[EndpointState] = (),
        model: str | None = None,
    ) -> Pick | float:
        """The endpoint for the next attempt, or the seconds until one may have room.

        Primary endpoints first, fallback ones only when no primary can take the call.
        Skipped: those in ``tried`` (pass ``()`` to start a new round), those serving
        another model than ``model`` (a resumed answer stays on its model), open
        circuits, half-open ones whose trial is out, saturated ones (waiting queue or KV
        cache at the admission limits, or ``/metrics`` failing for ``stale_after``
        seconds), draining ones. Among the rest: ``Routing.choices`` sampled by weight,
        the lowest load score wins (the session's own endpoint helped by affinity), ties
        at random. A float: nothing can take the call; ``math.inf`` when waiting cannot
        help (every endpoint already tried, or none serves ``model``).

        Example::

            pick = state.choose(now, session="conv-42", tried={first.endpoint})
        """
        with self._lock:
            live = [
                e
                for e in self._endpoints
                if not e.draining and e not in tried and (model is None or e.model == model)
            ]
            for tier in (0, 1):
                candidates = [
                    e
                    for e in live
                    if e.tier == tier and e.breaker.available(now) and not self._saturated(e, now)
                ]
                if candidates:
                    chosen = self._best(candidates, now, session)
                    return Pick(chosen, chosen.breaker.state(now) == "half_open")
            wait = self._wait(live, now)
            if not math.isinf(wait):
                self.last_call_at = now  # a waiting call keeps the watcher awake
        if not math.isinf(wait) and self.on_wait is not None:
            self.on_wait()
        return wait

    def _best(
        self, candidates: list[EndpointState], now: float, session: str | None
    ) -> EndpointState:
        routing = self.fleet.routing
        medians = self._ttft_medians(candidates[0].tier)
        loads = [self._load_part(e, now, medians) for e in candidates]
        scores = list(loads)
        sampled = weighted_sample([e.weight for e in candidates], routing.choices, self._rng)
        if session is not None and routing.affinity_weight > 0:
            home = rendezvous(session, [(e.key, e.weight) for e in candidates])
            if home is not None and affinity_holds(routing, loads[home], min(loads)):
                scores[home] -= routing.affinity_weight
                if home not in sampled:
                    sampled.append(home)
        # Weights act once: in the sample, or, when every candidate is in it, on ties.
        every = routing.choices <= 0 or routing.choices >= len(candidates)
        weights = [e.weight for e in candidates] if every else None
        return candidates[lowest(scores, sampled, self._rng, weights)]

    def _load_part(self, e: EndpointState, now: float, medians: dict[str, float]) -> float:
        limit = self.fleet.admission.queue_limit
        load = e.load if self._fresh(e, now) else None
        slow = self._slowness(e, now, medians)
        if load is None:
            return load_score(self.fleet.routing, e.in_flight / limit, slow)
        # Calls sent since the figures were read are not in them: count them as queued,
        # so that a burst between two reads spreads instead of piling on one endpoint.
        since = max(0, e.in_flight - e.in_flight_at_load)
        # Ours still waiting for a first token are queued or in prefill there, whatever
        # the last figures said: a replica that stopped answering piles them up at once.
        queued = max(load.waiting + since, len(e.unanswered))
        # A replica answering far slower than its peers is penalised even when its
        # figures look idle: a slow GPU, a noisy neighbour, or a network in between.
        kv = max(load.kv_cache, slow) if load.kv_cache is not None else slow
        return load_score(self.fleet.routing, queued / limit, kv)

    def _slowness(self, e: EndpointState, now: float, medians: dict[str, float]) -> float:
        median = medians.get(e.model)
        # A request waiting here longer than the others take to answer is news now: a
        # replica that just turned slow is avoided before its first slow answer is in.
        waiting = now - min(t.started_at for t in e.unanswered) if e.unanswered else None
        pending = ttft_term(waiting, median)
        if e.unanswered and self.fleet.hedging is not None and self._stalled(e):
            return 1.0  # only hedging marks requests late
        if e.rescued:
            pending = max(pending, self._overtaken_term(e, now, median))
        if e.ttft_at is None:
            return pending
        # Fades without news: a replica avoided for being slow gets no new first-token
        # times, and would otherwise be avoided for ever after it recovered.
        fading = 1.0 - (now - e.ttft_at) / _TTFT_MEMORY
        if fading <= 0.0:
            return pending
        return max(pending, fading * ttft_term(e.ttft_ewma, median))

    @staticmethod
    def _stalled(e: EndpointState) -> bool:
        # A request here is late (its hedge was due) and nothing sent here after it has
        # answered: the endpoint stalled, as far as anyone can tell, and each call sent
        # there would wait out the hedge delay before being rescued, or longer once the
        # hedge budget is spent. A late straggler of a busy, healthy endpoint does not
        # count: the requests sent there after it have answered.
        answered = e.answered_start
        return any(t._late and (answered is None or answered <= t.started_at) for t in e.unanswered)

    @staticmethod
    def _overtaken_term(e: EndpointState, now: float, median: float | None) -> float:
        # A request overtaken by its hedge was cut, not answered: for all anyone knows it
        # is still waiting, until the endpoint answers a request sent after it. Without
        # this, the cut empties `unanswered` and the bound its wait gave (the hedge delay
        # plus the hedge's first token, twice the median or so) made a replica ten times
        # slower than its peers look nearly as good as they do. Fades without news.
        answered = e.answered_start
        term = 0.0
        for sent, lost_at in e.rescued:
            if answered is not None and answered > sent:
                continue
            fading = 1.0 - (now - lost_at) / _TTFT_MEMORY
            if fading > 0.0:
                term = max(term, fading * ttft_term(now - sent, median))
        return term

    def _ttft_medians(self, tier: int) -> dict[str, float]:
        by_model: dict[str, list[float]] = {}
        for e in self._endpoints:
            if e.tier == tier and not e.draining and e.ttft_ewma is not None:
                by_model.setdefault(e.model, []).append(e.ttft_ewma)
        return {model: statistics.median(values) for model, values in by_model.items()}

    def _fresh(self, e: EndpointState, now: float) -> bool:
        return (
            e.load is not None
            and e.load_at is not None
            and now - e.load_at <= self.fleet.stale_after
        )

    def _stale(self, e: EndpointState) -> bool:
        # Old figures alone are not stale: while the client is idle nobody reads /metrics.
        # Stale means the endpoint was asked and has not answered for stale_after seconds.
        return (
            self.fleet.scrape_interval is not None
            and e.load_at is not None
            and e.scraped_at is not None
            and e.scraped_at - e.load_at > self.fleet.stale_after
        )

    def _saturated(self, e: EndpointState, now: float) -> bool:
        if self._stale(e):
            return True
        if not self._fresh(e, now) or e.load is None:
            return False
        admission = self.fleet.admission
        kv = e.load.kv_cache if e.load.kv_cache is not None else 0.0
        return max(e.load.waiting / admission.queue_limit, kv / admission.kv_limit) >= 1.0

    def _wait(self, live: list[EndpointState], now: float) -> float:
        waits = [self._wait_for(e, now) for e in live]
        return max(min(waits, default=math.inf), _MIN_WAIT)

    def _wait_for(self, e: EndpointState, now: float) -> float:
        state = e.breaker.state(now)
        if state == "open" and e.breaker.reopens_at is not None:
            return e.breaker.reopens_at - now
        if state == "half_open":
            return self.fleet.breaker.probe_interval  # the trial's outcome, or a probe
        interval = self.fleet.scrape_interval or self.fleet.stale_after
        if self._stale(e) or e.load_at is None:
            return interval
        return e.load_at + interval - now  # the next read of /metrics

    # -- attempts ----------------------------------------------------------------------

    def started(self, pick: Pick, now: float) -> AttemptTicket:
        """An attempt is being sent to ``pick.endpoint``: count it in flight.

        A half-open pick takes the endpoint's one trial slot here (if another attempt
        took it first, this one goes as an ordinary attempt).

        Example::

            with state.started(pick, now) as ticket:
                ...
        """
        endpoint = pick.endpoint
        with self._lock:
            trial = None
            breaker = endpoint.breaker
            if pick.trial and breaker.state(now) == "half_open" and breaker.admit(now):
                trial = breaker.trial
            endpoint.in_flight += 1
            endpoint.calls += 1
            ticket = AttemptTicket(self, endpoint, trial, now)
            endpoint.unanswered.add(ticket)
            return ticket

    def _record_ttft(self, e: EndpointState, ttft: float, now: float) -> None:
        self._record_ttft_average(e, ttft, now)
        if self._window:
            self._ttfts.setdefault(e.model, deque(maxlen=self._window)).append((e, ttft))

    def _record_no_first_token(
        self, e: EndpointState, waited: float, now: float, *, whole: bool
    ) -> None:
        # Cut after `waited` seconds without a first token (it lost a hedge race): its
        # first-token time is at least that. Only ever raises the average, so that an
        # endpoint whose calls are always rescued by hedges is still seen to be slow; not
        # a sample of the window, whose percentile must not learn from cut requests.
        if e.ttft_ewma is not None and waited <= e.ttft_ewma:
            return
        if whole:
            # Nothing sent here after it has answered either: the endpoint is that slow
            # now, not this one request. Averaged in, the bound would take several lost
            # races to show, each of them a call rescued late.
            e.ttft_ewma = waited
            e.ttft_at = now
        else:
            self._record_ttft_average(e, waited, now)

    @staticmethod
    def _record_ttft_average(e: EndpointState, ttft: float, now: float) -> None:
        e.ttft_ewma = (
            ttft if e.ttft_ewma is None else e.ttft_ewma + _TTFT_ALPHA * (ttft - e.ttft_ewma)
        )
        e.ttft_at = now

    def _drop(self, e: EndpointState) -> None:
        if e in self._endpoints:
            self._endpoints.remove(e)

    # -- what the watcher learns -------------------------------------------------------

    def record_load(self, endpoint: EndpointState, report: LoadReport | None, now: float) -> None:
        """The result of reading ``/metrics`` at ``now``: figures, or ``None`` (no answer).

        ``None`` keeps the old figures: they age, and an endpoint that served figures
        before and stops answering for ``stale_after`` seconds counts as saturated.

        Example::

            state.record_load(endpoint, parse_vllm_load(text), now)
        """
        with self._lock:
            endpoint.scraped_at = now
            if report is not None:
                endpoint.load = report
                endpoint.load_at = now
                endpoint.in_flight_at_load = endpoint.in_flight

    def record_probe(self, endpoint: EndpointState, ok: bool, now: float) -> None:
        """The result of a ``/health`` probe: closes (or reopens) a half-open circuit.

        Example::

            state.record_probe(endpoint, response.status_code == 200, now)
        """
        with self._lock:
            breaker = endpoint.breaker
            recovering = breaker.state(now) != "closed"
            breaker.probed(ok, now)
            if recovering and breaker.state(now) == "closed":
                endpoint.recovered()

    def replace_discovered(self, urls: Iterable[str], now: float) -> None:
        """The base URLs DNS gives now (``DNSDiscovery.url_for`` of each address).

        Endpoints still listed keep their state; new ones join the primary tier; gone
        ones are dropped, or, while requests run there, drained (never chosen again,
        dropped when the last one ends). Pass only the answer of a successful lookup.

        Example::

            state.replace_discovered([discovery.url_for(a) for a in addresses], now)
        """
        discovery = self.fleet.discovery
        if discovery is None:
            return
        model = discovery.model or self.fleet.model
        wanted = [Endpoint(url, model=model, api_key=discovery.api_key) for url in urls]
        with self._lock:
            listed = [e for e in self._endpoints if e.tier == 0 and not e.discovered]
            fallback = [e for e in self._endpoints if e.tier == 1]
            known = {e.key: e for e in self._endpoints if e.discovered}
            taken = {e.key for e in listed}
            found: list[EndpointState] = []
            for endpoint in wanted:
                state = known.pop(f"{endpoint.base_url} {model}", None)
                if state is None:
                    state = self._state_of(endpoint, model, 0, discovered=True)
                if state.key in taken:
                    continue  # listed in Fleet.endpoints too, or twice in DNS
                taken.add(state.key)
                state.draining = False
                found.append(state)
            for gone in known.values():
                gone.draining = True
            draining = [e for e in known.values() if e.in_flight > 0]
            self._endpoints = listed + found + draining + fallback

    # -- hedging and idleness ----------------------------------------------------------

    def note_call(self, now: float) -> None:
        """A call started: counts toward the hedge budget and keeps the watcher awake.

        Example::

            state.note_call(time.monotonic())
        """
        with self._lock:
            self.last_call_at = now
            self.calls += 1
            hedging = self.fleet.hedging
            if hedging is not None:
                self._hedge_tokens = min(self._hedge_burst, self._hedge_tokens + hedging.budget)

    def take_hedge(self, now: float) -> bool:
        """Whether a hedge may be sent now; if so, it is counted against the budget.

        Example::

            if state.take_hedge(now):
                ...  # send the hedge
        """
        with self._lock:
            if self.fleet.hedging is None or self._hedge_tokens < 1.0:
                return False
            self._hedge_tokens -= 1.0
            return True

    def hedge_delay(self, model: str, now: float) -> float | None:
        """Seconds without a first token after which a call of ``model`` is hedged.

        ``Hedging.delay`` when set; else the ``percentile`` of the model's recent
        first-token times (at least ``min_delay``); ``None`` when hedging is off or
        fewer than 20 first-token times are known. The percentile is taken per endpoint
        and the delay is the median of those (the lower one of two): a degraded replica,
        whose slow first tokens are what hedging is for, must not set the delay.

        Example::

            delay = state.hedge_delay("Qwen/Qwen3-8B", now)  # None: do not hedge
        """
        hedging = self.fleet.hedging
        if hedging is None:
            return None
        if hedging.delay is not None:
            return hedging.delay
        with self._lock:
            recent = list(self._ttfts.get(model, ()))
        if len(recent) < MIN_TTFT_SAMPLES:
            return None
        by_endpoint: dict[EndpointState, list[float]] = {}
        for endpoint, ttft in recent:
            by_endpoint.setdefault(endpoint, []).append(ttft)
        # An endpoint with a handful of samples says little; all together still do.
        groups = [g for g in by_endpoint.values() if len(g) >= _MIN_ENDPOINT_SAMPLES]
        percentiles = [
            _percentile(g, hedging.percentile) for g in groups or [[t for _, t in recent]]
        ]
        return max(statistics.median_low(percentiles), hedging.min_delay)

    def hedge_at(self, ticket: AttemptTicket, delay: float, now: float) -> float:
        """When the request of ``ticket`` is due a hedge, ``delay`` being the hedge delay.

        ``delay`` after it was sent, or sooner: as soon as a request sent before it to
        the same endpoint is overdue (no first token after ``delay``) while another
        endpoint of the model has answered since that request was sent, and no request
        sent later to this one has. That endpoint has turned slow, not the whole fleet,
        and the requests it holds would each wait out their own delay before being
        rescued. Before that time it is not known: ask again then.

        An older request here that lost a hedge race while this one was in flight
        counts as overdue, though it is gone: the hedge that rescued it may win and
        cut it before this request's shell asks (a thread woken a little late).

        Example::

            wake_at = state.hedge_at(attempt.ticket, delay, now)
        """
        own = ticket.started_at
        at = own + delay
        endpoint = ticket.endpoint
        with self._lock:
            here = endpoint.answered_start
            for sent, lost_at in endpoint.rescued:
                if sent < own < lost_at and (here is None or here <= sent):
                    return now
            elsewhere: float | None = None
            for other in endpoint.unanswered:
                sent = other.started_at
                if sent >= own:
                    continue
                if sent + delay > now:  # not overdue yet: look again when it is
                    at = min(at, sent + delay)
                    continue
                if here is not None and here > sent:
                    continue  # sent later, answered here: that request is slow, not this endpoint
                if elsewhere is None:
                    elsewhere = max(
                        (
                            e.answered_at
                            for e in self._endpoints
                            if e is not endpoint
                            and e.model == endpoint.model
                            and e.answered_at is not None
                        ),
                        default=-math.inf,
                    )
                if elsewhere > sent:
                    return now
        return at

    def loads(self, now: float | None = None) -> list[EndpointLoad]:
        """A snapshot of every endpoint's load and circuit state (``now``: ``clock()``).

        Example::

            [(load.name, load.in_flight, load.state) for load in state.loads()]
        """
        at = self.clock() if now is None else now
        with self._lock:
            return [
                EndpointLoad(
                    name=e.name,
                    url=e.url,
                    model=e.model,
                    in_flight=e.in_flight,
                    running=e.load.running if e.load is not None else None,
                    waiting=e.load.waiting if e.load is not None else None,
                    kv_cache=e.load.kv_cache if e.load is not None else None,
                    state=e.breaker.state(at),
                    fresh=self._fresh(e, at) and not self._stale(e),
                )
                for e in self._endpoints
            ]


def _percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile: a value that was seen, never an interpolation."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
