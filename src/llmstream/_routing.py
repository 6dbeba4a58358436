"""Choosing an endpoint (pure): load scores, power-of-k sampling, rendezvous hashing.

No state and no clock: :class:`~llmstream._fleet_state.FleetState` gathers the figures
and calls these. Randomness comes from a ``random.Random`` passed in, so tests fix it.

Example::

    rng = random.Random(7)
    sampled = weighted_sample([1.0, 2.0, 1.0], 2, rng)        # two distinct indices
    best = lowest([0.4, 0.1, 0.1], sampled, rng)               # 1 or 2 when sampled, at random
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from ._fleet_config import Routing

__all__ = [
    "affinity_holds",
    "load_score",
    "lowest",
    "rendezvous",
    "rendezvous_score",
    "ttft_term",
    "weighted_sample",
]

# Scores closer than this are a tie: float noise must not decide between endpoints.
_TIE = 1e-9


def load_score(routing: Routing, queue_term: float, kv_term: float) -> float:
    """An endpoint's load score, lower is better: ``queue_weight*queue + kv_weight*kv``.

    Example::

        load_score(Routing(), queue_term=0.25, kv_term=0.5)  # 2*0.25 + 2*0.5 = 1.5
    """
    return routing.queue_weight * queue_term + routing.kv_weight * kv_term


# First tokens up to this many times the median are noise (batching, a long prompt);
# from _SLOW_RATIO times on the endpoint counts as fully loaded.
_NOISE_RATIO = 1.5
_SLOW_RATIO = 4.0
# Nor is a few milliseconds, whatever the ratio: on a fast network or with tiny prompts
# the median itself is milliseconds.
_SLACK = 0.025


def ttft_term(ttft: float | None, median: float | None) -> float:
    """A stand-in for KV-cache use without ``/metrics``: how much slower than the median.

    0 up to 1.5 times the median (or within 25 ms of it), rising to 1 at 4 times; 0 when
    either is unknown.
    Small differences are noise that must not outweigh in-flight counts; a replica
    several times slower than its peers is degraded, whatever its figures say.

    Example::

        ttft_term(0.25, 0.2)  # 0.0: within the noise
        ttft_term(0.5, 0.2)   # 0.4: two and a half times the fleet's median
        ttft_term(None, 0.2)  # 0.0
    """
    if ttft is None or median is None or median <= 0 or ttft - median < _SLACK:
        return 0.0
    ratio = ttft / median
    return min(1.0, max(0.0, (ratio - _NOISE_RATIO) / (_SLOW_RATIO - _NOISE_RATIO)))


def affinity_holds(routing: Routing, preferred_load: float, best_load: float) -> bool:
    """Whether a session stays on its endpoint: not more than ``max_imbalance`` busier.

    Example::

        affinity_holds(Routing(max_imbalance=0.5), preferred_load=0.9, best_load=0.3)  # False
    """
    return preferred_load <= best_load + routing.max_imbalance + _TIE


def weighted_sample(weights: Sequence[float], k: int, rng: random.Random) -> list[int]:
    """``k`` distinct indices drawn with probability proportional to weight, in draw order.

    ``k <= 0`` or ``k >= len(weights)``: every index (shuffled). Efraimidis-Spirakis
    (2006): the ``k`` largest keys ``log(u) / weight`` of uniform ``u`` in (0, 1].

    Example::

        weighted_sample([1.0, 9.0], 1, random.Random(0))  # [1] nine times in ten
    """
    keys = [math.log(1.0 - rng.random()) / weight for weight in weights]
    order = sorted(range(len(weights)), key=keys.__getitem__, reverse=True)
    return order if k <= 0 else order[:k]


def lowest(
    scores: Sequence[float],
    among: Sequence[int],
    rng: random.Random,
    weights: Sequence[float] | None = None,
) -> int:
    """The index in ``among`` with the lowest score; ties are broken at random, by weight.

    Always taking the first of equal scores would send every call to the endpoint
    listed first whenever the fleet is idle (all scores 0). With ``weights``, each tied
    index wins in proportion to its weight, so an idle fleet splits calls as weighted.

    Example::

        lowest([0.0, 0.0, 0.0], [0, 1, 2], random.Random())  # 0, 1 or 2, equally likely
        lowest([0.0, 0.0], [0, 1], random.Random(), [3.0, 1.0])  # 0 three times in four
    """
    if not among:
        raise ValueError("lowest() needs at least one index")
    best = among[0]
    tied = weights[best] if weights is not None else 1.0
    for index in among[1:]:
        weight = weights[index] if weights is not None else 1.0
        if scores[index] < scores[best] - _TIE:
            best, tied = index, weight
        elif abs(scores[index] - scores[best]) <= _TIE:
            tied += weight
            # Weighted reservoir sampling of one: each tied index ends up chosen with
            # its weight over the sum of the tied weights.
            if rng.random() * tied < weight:
                best = index
    return best


def rendezvous_score(key: str, endpoint_id: str, weight: float) -> float:
    """Weighted rendezvous (highest random weight) score of ``endpoint_id`` for ``key``.

    ``-weight / log(u)``, ``u`` from BLAKE2b of both (the same in every process, unlike
    ``hash()``), mapped into (0, 1). The endpoint with the highest score owns the key;
    removing an endpoint moves only the keys it owned.

    Example::

        rendezvous_score("conv-42", "http://gpu-1:8000/v1", 1.0)  # the same number every run
    """
    digest = hashlib.blake2b(
        f"{key}\x00{endpoint_id}".encode(errors="surrogatepass"), digest_size=8
    ).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
    return -weight / math.log(u)


def rendezvous(key: str, endpoints: Sequence[tuple[str, float]]) -> int | None:
    """Index of the endpoint (``(id, weight)`` pairs) that owns ``key``; ``None`` if empty.

    Example::

        rendezvous("conv-42", [("http://gpu-1:8000/v1", 1.0), ("http://gpu-2:8000/v1", 1.0)])
    """
    if not endpoints:
        return None
    scores = [rendezvous_score(key, ident, weight) for ident, weight in endpoints]
    return max(range(len(scores)), key=scores.__getitem__)
