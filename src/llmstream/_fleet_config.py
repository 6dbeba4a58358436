"""How a client spreads its calls over several vLLM replicas: the public fleet settings.

Plain frozen dataclasses, checked when built (:class:`~llmstream.InvalidRequestError`
says what is wrong and what to pass instead). The live state they drive is
:mod:`llmstream._fleet_state`; the choice itself is :mod:`llmstream._routing`.

Example::

    fleet = llmstream.Fleet(
        [llmstream.Endpoint("http://gpu-1:8000/v1"), llmstream.Endpoint("http://gpu-2:8000/v1")],
        model="Qwen/Qwen3-8B",
    )
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from ._config import resolve_base_url
from ._counts import require_count
from ._errors import InvalidRequestError

__all__ = [
    "Admission",
    "CircuitBreaker",
    "DNSDiscovery",
    "Endpoint",
    "Fleet",
    "Hedging",
    "Routing",
    "endpoint_label",
]

# hedge_delay needs this many first-token times of a model before a percentile means
# anything; Hedging.window must be able to hold them.
MIN_TTFT_SAMPLES = 20


def _require_number(name: str, value: object, *, low: float, strict: bool, hint: str) -> None:
    """Raise unless ``value`` is a finite real number above ``low`` (or equal, if not strict)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if strict else value >= low)
    )
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise InvalidRequestError(f"{name} must be a finite number {bound}, got {value!r}; {hint}")


def _require_name(name: str, value: object, hint: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidRequestError(
            f"{name} must be a non-empty string or None, got {value!r}; {hint}"
        )


def _require_key(owner: str, value: object) -> None:
    # The value is never echoed: it is meant to be a secret.
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRequestError(
            f"{owner}.api_key must be a non-empty string or None (got a {type(value).__name__}); "
            "leave it out to send no key"
        )


def _endpoint_url(base_url: object) -> str:
    if not isinstance(base_url, str) or not base_url.strip():
        raise InvalidRequestError(
            f"Endpoint base_url must be a URL such as http://gpu-1:8000/v1, got {base_url!r}"
        )
    # An empty environment: an endpoint is exactly the URL given, never LLMSTREAM_BASE_URL.
    return resolve_base_url(base_url.strip(), {})


def endpoint_label(base_url: str) -> str:
    """``host:port`` of a base URL: the default name of an :class:`Endpoint`.

    Example::

        endpoint_label("http://gpu-1:8000/v1")   # "gpu-1:8000"
        endpoint_label("https://[::1]/v1")       # "[::1]:443"
    """
    url = httpx.URL(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    """One vLLM (or OpenAI-compatible) server of a :class:`Fleet`.

    ``model`` is the model it serves (``None``: the fleet's ``model``), ``weight``
    its relative share of the calls when load is equal, ``api_key`` the key sent to
    it (never shown in a repr or an error), ``name`` its label in load reports
    (``None``: ``host:port``).

    Example::

        llmstream.Endpoint("http://gpu-2:8000/v1", model="Qwen/Qwen3-8B", weight=2.0)
    """

    base_url: str
    model: str | None = None
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", _endpoint_url(self.base_url))
        _require_name("Endpoint model", self.model, "pass the model this server serves")
        _require_number(
            "Endpoint weight",
            self.weight,
            low=0.0,
            strict=True,
            hint="it is the endpoint's relative share of calls (1.0 by default)",
        )
        _require_key("Endpoint", self.api_key)
        _require_name("Endpoint name", self.name, "leave it out to use host:port")

    @property
    def label(self) -> str:
        """``name``, else ``host:port`` of the base URL.

        Example::

            llmstream.Endpoint("http://gpu-1:8000/v1").label  # "gpu-1:8000"
        """
        return self.name or endpoint_label(self.base_url)


@dataclass(frozen=True)
class DNSDiscovery:
    """Find the fleet's endpoints in DNS: one endpoint per A/AAAA record of ``host``.

    Each address becomes ``{scheme}://{address}:{port}{path}`` (an IPv6 address in
    brackets), serving ``model`` (``None``: the fleet's ``model``), re-resolved every
    ``interval`` seconds. A Kubernetes headless Service name is the usual ``host``.
    Endpoints that disappear from DNS finish their calls and are then dropped.

    Example::

        llmstream.DNSDiscovery("vllm.ns.svc.cluster.local", port=8000, model="Qwen/Qwen3-8B")
    """

    host: str
    port: int = 8000
    scheme: str = "http"
    path: str = "/v1"
    model: str | None = None
    interval: float = 10.0
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip() or "/" in self.host:
            raise InvalidRequestError(
                f"DNSDiscovery host must be a DNS name such as vllm.ns.svc.cluster.local "
                f"(no scheme or path: pass scheme= and path=), got {self.host!r}"
            )
        require_count("DNSDiscovery port", self.port)
        if self.port > 65535:
            raise InvalidRequestError(f"DNSDiscovery port must be 1..65535, got {self.port!r}")
        if self.scheme not in ("http", "https"):
            raise InvalidRequestError(
                f'DNSDiscovery scheme must be "http" or "https", got {self.scheme!r}'
            )
        if not isinstance(self.path, str) or (self.path and not self.path.startswith("/")):
            raise InvalidRequestError(
                f'DNSDiscovery path must start with "/" (for example "/v1"), got {self.path!r}'
            )
        _require_name("DNSDiscovery model", self.model, "pass the model the servers serve")
        _require_number(
            "DNSDiscovery interval",
            self.interval,
            low=0.0,
            strict=True,
            hint="it is how often, in seconds, DNS is asked again",
        )
        _require_key("DNSDiscovery", self.api_key)
        _endpoint_url(self.url_for("192.0.2.1"))  # the scheme, port and path make a URL

    def url_for(self, address: str) -> str:
        """The base URL of the endpoint at ``address`` (an IPv4 or IPv6 address).

        Example::

            DNSDiscovery("vllm", port=8000).url_for("10.0.0.7")  # "http://10.0.0.7:8000/v1"
            DNSDiscovery("vllm").url_for("fd00::7")             # "http://[fd00::7]:8000/v1"
        """
        host = f"[{address}]" if ":" in address else address  # IPv6 (RFC 3986)
        return f"{self.scheme}://{host}:{self.port}{self.path}".rstrip("/")


@dataclass(frozen=True)
class Routing:
    """How the endpoint of a call is chosen: load score weights and sampling.

    An endpoint's load score is ``queue_weight * queue + kv_weight * kv`` (lower is
    better), where ``queue`` is its waiting requests (at least the client's own there
    without a first token yet) over ``Admission.queue_limit`` and ``kv`` its KV-cache
    use (from ``/metrics``; without them, the client's own calls in flight and
    first-token times). A call with a session prefers the
    session's endpoint (rendezvous hashing: the KV prefix cache is there) by
    ``affinity_weight``, while that endpoint's load score is at most
    ``max_imbalance`` above the best. ``choices`` endpoints are sampled by weight and
    the least loaded wins (power of two choices); ``0`` considers them all.

    Example::

        llmstream.Routing(choices=0)             # always the least loaded endpoint
        llmstream.Routing(affinity_weight=0.0)   # no session stickiness
    """

    queue_weight: float = 2.0
    kv_weight: float = 2.0
    affinity_weight: float = 3.0
    choices: int = 2
    max_imbalance: float = 0.5

    def __post_init__(self) -> None:
        for name in ("queue_weight", "kv_weight", "affinity_weight", "max_imbalance"):
            _require_number(
                f"Routing {name}",
                getattr(self, name),
                low=0.0,
                strict=False,
                hint="0 turns this part of the score off",
            )
        require_count("Routing choices (0: consider every endpoint)", self.choices, minimum=0)


@dataclass(frozen=True)
class CircuitBreaker:
    """When an endpoint is taken out of rotation, and for how long.

    ``failures`` consecutive failures (connection errors, timeouts and 5xx before the
    first token; not the caller's own 4xx) open the circuit for ``cooldown`` seconds,
    doubling at each new opening up to ``max_cooldown``. Then one trial call is let
    through (half-open): success closes the circuit, failure opens it again. While the
    client is busy, every endpoint's ``/health`` is probed every ``probe_interval``
    seconds: ``failures`` failed probes in a row take it out too (and then a probe,
    not a call, tries it first after the cool-down), and during the cool-down a failed
    probe keeps it out.

    Example::

        llmstream.CircuitBreaker(failures=5, cooldown=2.0, max_cooldown=30.0)
    """

    failures: int = 3
    cooldown: float = 1.0
    max_cooldown: float = 60.0
    probe_interval: float = 1.0

    def __post_init__(self) -> None:
        require_count("CircuitBreaker failures", self.failures)
        for name in ("cooldown", "max_cooldown", "probe_interval"):
            _require_number(
                f"CircuitBreaker {name}", getattr(self, name), low=0.0, strict=True, hint="seconds"
            )
        if self.max_cooldown < self.cooldown:
            raise InvalidRequestError(
                f"CircuitBreaker max_cooldown ({self.max_cooldown:g} s) must be at least "
                f"cooldown ({self.cooldown:g} s): it caps the doubling cool-down"
            )


@dataclass(frozen=True)
class Admission:
    """When an endpoint is too busy to take another call, and what a call does then.

    An endpoint is saturated when its ``vllm:num_requests_waiting`` reaches
    ``queue_limit`` or its KV-cache use reaches ``kv_limit`` (a fraction, 0..1), or
    when its ``/metrics`` stopped answering. When every endpoint is saturated or down,
    a call waits up to ``wait`` seconds for room, then raises
    :class:`~llmstream.OverloadedError` (``0``: at once).

    Example::

        llmstream.Admission(queue_limit=16, kv_limit=0.9, wait=2.0)
    """

    queue_limit: int = 64
    kv_limit: float = 0.85
    wait: float = 0.0

    def __post_init__(self) -> None:
        require_count("Admission queue_limit", self.queue_limit)
        _require_number(
            "Admission kv_limit",
            self.kv_limit,
            low=0.0,
            strict=True,
            hint="it is a fraction of the KV cache, such as 0.85",
        )
        if self.kv_limit > 1:
            raise InvalidRequestError(
                f"Admission kv_limit is a fraction of the KV cache (0 < kv_limit <= 1), got "
                f"{self.kv_limit!r}; pass 1.0 to saturate only on a full cache"
            )
        _require_number(
            "Admission wait",
            self.wait,
            low=0.0,
            strict=False,
            hint="seconds to wait for room (0: raise OverloadedError at once)",
        )


@dataclass(frozen=True)
class Hedging:
    """Send a second request to another endpoint when the first token is late.

    The hedge goes out after ``delay`` seconds, or (``delay=None``) after the
    ``percentile`` of the model's last ``window`` first-token times, taken per endpoint
    and the median of those, so that one degraded replica does not set it (at least
    ``min_delay``; no hedging until 20 are known). The first to answer wins; the
    other is cancelled. Hedges are at most ``budget`` of the calls (a token bucket
    whose burst is ``budget * window``, at least 3, full at the start), so a slow fleet
    is not sent twice the load. The default 10 % leaves room above the 5 % of calls that
    a 95th-percentile delay hedges in steady state, for when a replica turns slow.

    Example::

        llmstream.Hedging(delay=0.5)
        llmstream.Hedging(percentile=0.95, budget=0.05)
    """

    delay: float | None = None
    percentile: float = 0.95
    min_delay: float = 0.05
    budget: float = 0.1
    window: int = 200

    def __post_init__(self) -> None:
        if self.delay is not None:
            _require_number(
                "Hedging delay",
                self.delay,
                low=0.0,
                strict=True,
                hint="seconds before the hedge, or None to follow first-token times",
            )
        _require_number(
            "Hedging percentile", self.percentile, low=0.0, strict=True, hint="such as 0.95"
        )
        if self.percentile > 1:
            raise InvalidRequestError(
                f"Hedging percentile is a fraction in (0, 1], such as 0.95, got {self.percentile!r}"
            )
        _require_number("Hedging min_delay", self.min_delay, low=0.0, strict=False, hint="seconds")
        _require_number(
            "Hedging budget",
            self.budget,
            low=0.0,
            strict=False,
            hint="the largest fraction of calls hedged, such as 0.05",
        )
        if self.budget > 1:
            raise InvalidRequestError(
                f"Hedging budget is the largest fraction of calls hedged, in [0, 1], "
                f"got {self.budget!r}"
            )
        require_count(
            f"Hedging window (first-token times kept, at least {MIN_TTFT_SAMPLES})",
            self.window,
            minimum=MIN_TTFT_SAMPLES,
        )


@dataclass(frozen=True)
class Fleet:
    """Several servers behind one client: where calls go, and what happens when they are busy.

    ``endpoints`` take the calls; ``fallback`` endpoints (each naming its model, often
    a smaller one) only when every primary endpoint is saturated, down or already
    tried. ``discovery`` adds primary endpoints found in DNS. ``model`` is the model
    of endpoints that name none. ``/metrics`` of each endpoint is read every
    ``scrape_interval`` seconds while the client is in use (``None``: never; load is
    then the client's own calls in flight), and figures older than ``stale_after``
    seconds are not trusted. A call's ``extra_headers`` value for ``session_header``
    is its session: calls of one session go to the same endpoint while it is not much
    busier than the others (its KV prefix cache is warm).

    Example::

        fleet = llmstream.Fleet(
            [llmstream.Endpoint("http://gpu-1:8000/v1"), llmstream.Endpoint("http://gpu-2:8000/v1")],
            model="Qwen/Qwen3-8B",
            fallback=[llmstream.Endpoint("http://small:8000/v1", model="Qwen/Qwen3-1.7B")],
        )
        client = llmstream.AsyncClient(fleet=fleet)
    """

    endpoints: Sequence[Endpoint] = ()
    fallback: Sequence[Endpoint] = ()
    model: str | None = None
    discovery: DNSDiscovery | None = None
    routing: Routing = Routing()
    breaker: CircuitBreaker = CircuitBreaker()
    admission: Admission = Admission()
    hedging: Hedging | None = None
    scrape_interval: float | None = 1.0
    stale_after: float = 5.0
    session_header: str | None = "X-Session-ID"

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", _endpoint_tuple("endpoints", self.endpoints))
        object.__setattr__(self, "fallback", _endpoint_tuple("fallback", self.fallback))
        _require_name("Fleet model", self.model, "pass the model the endpoints serve")
        self._check_parts()
        if not self.endpoints and self.discovery is None:
            raise InvalidRequestError(
                "Fleet needs endpoints=[llmstream.Endpoint(...), ...] or "
                "discovery=llmstream.DNSDiscovery(...)"
            )
        self._check_models()
        self._check_timing()
        if self.session_header is not None and (
            not isinstance(self.session_header, str) or not self.session_header.strip()
        ):
            raise InvalidRequestError(
                f"Fleet session_header must be a header name such as X-Session-ID, or None, "
                f"got {self.session_header!r}"
            )

    def _check_parts(self) -> None:
        parts: list[tuple[str, object, type]] = [
            ("routing", self.routing, Routing),
            ("breaker", self.breaker, CircuitBreaker),
            ("admission", self.admission, Admission),
        ]
        parts += [("discovery", self.discovery, DNSDiscovery)] if self.discovery else []
        parts += [("hedging", self.hedging, Hedging)] if self.hedging else []
        for name, value, kind in parts:
            if not isinstance(value, kind):
                raise InvalidRequestError(
                    f"Fleet {name} must be a llmstream.{kind.__name__}, "
                    f"got a {type(value).__name__}"
                )

    def _check_models(self) -> None:
        for endpoint in self.endpoints:
            if (endpoint.model or self.model) is None:
                raise InvalidRequestError(
                    f"endpoint {endpoint.label} has no model: pass Endpoint(..., model=...) "
                    "or Fleet(..., model=...)"
                )
        for endpoint in self.fallback:
            if endpoint.model is None:
                raise InvalidRequestError(
                    f"fallback endpoint {endpoint.label} must name its model: "
                    "Endpoint(..., model=...)"
                )
        if self.discovery is not None and (self.discovery.model or self.model) is None:
            raise InvalidRequestError(
                "DNSDiscovery has no model: pass DNSDiscovery(..., model=...) "
                "or Fleet(..., model=...)"
            )
        seen: set[tuple[str, str | None]] = set()
        for endpoint in (*self.endpoints, *self.fallback):
            identity = (endpoint.base_url, self.model_of(endpoint))
            if identity in seen:
                raise InvalidRequestError(
                    f"endpoint {endpoint.base_url} for model {identity[1]} is listed twice; "
                    "give it once (raise its weight to send it more calls)"
                )
            seen.add(identity)

    def _check_timing(self) -> None:
        if self.scrape_interval is not None:
            _require_number(
                "Fleet scrape_interval",
                self.scrape_interval,
                low=0.0,
                strict=True,
                hint="seconds between reads of /metrics, or None to never read them",
            )
        _require_number(
            "Fleet stale_after",
            self.stale_after,
            low=0.0,
            strict=True,
            hint="seconds after which /metrics figures are not trusted",
        )
        if self.scrape_interval is not None and self.stale_after <= self.scrape_interval:
            raise InvalidRequestError(
                f"Fleet stale_after ({self.stale_after:g} s) must be longer than "
                f"scrape_interval ({self.scrape_interval:g} s), or every figure would "
                "go stale before the next read"
            )

    def model_of(self, endpoint: Endpoint) -> str | None:
        """The model ``endpoint`` serves: its own, else the fleet's.

        Example::

            fleet.model_of(llmstream.Endpoint("http://gpu-1:8000/v1"))  # fleet.model
        """
        return endpoint.model or self.model


def _endpoint_tuple(name: str, value: object) -> tuple[Endpoint, ...]:
    if isinstance(value, str | Endpoint) or not isinstance(value, Sequence):
        raise InvalidRequestError(
            f"Fleet {name} must be a list of llmstream.Endpoint, got {type(value).__name__}"
        )
    for item in value:
        if not isinstance(item, Endpoint):
            raise InvalidRequestError(
                f"Fleet {name} must hold llmstream.Endpoint objects, got a "
                f"{type(item).__name__}; wrap URLs as llmstream.Endpoint(url)"
            )
    return tuple(value)
