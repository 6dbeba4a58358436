"""Where each request of one call goes, over a fleet (sans-IO).

:class:`CallRoute` is the call's side of :class:`~llmstream._fleet_state.FleetState`: it
remembers which endpoints this call has tried, moves a call that failed before its first
token to another endpoint and then to the fallback model, keeps a resumed answer on its
model, decides when a hedge is due, and classifies failures for the circuit breakers.
The call core (:mod:`llmstream._call`) asks it and the shells never do.

Example::

    route = CallRoute(state, session="conv-42")
    pick = route.pick(now)          # a Pick, or seconds to wait for room
"""

from __future__ import annotations

from ._errors import (
    APIConnectionError,
    APIStatusError,
    LLMStreamError,
    ProtocolError,
    ServerStreamError,
    StreamInterrupted,
    TotalTimeout,
)
from ._fleet_state import AttemptTicket, EndpointState, FleetState, Pick

__all__ = ["CallRoute", "endpoint_fault"]

# Statuses that say the endpoint is unwell or overloaded (not the request's fault).
_ENDPOINT_STATUSES = frozenset({408, 429})


def endpoint_fault(error: LLMStreamError) -> bool:
    """Whether ``error`` says something about the endpoint (its breaker counts it).

    A refused request (400, 404, 422...) is the caller's: another replica would refuse it
    too. A call that ran out of its own total time says nothing about the server.

    Example::

        endpoint_fault(InternalServerError(...))  # True
        endpoint_fault(BadRequestError(...))      # False
    """
    if isinstance(error, TotalTimeout):
        return False
    if isinstance(error, APIStatusError):
        return error.status_code >= 500 or error.status_code in _ENDPOINT_STATUSES
    return isinstance(
        error, APIConnectionError | StreamInterrupted | ServerStreamError | ProtocolError
    )


class CallRoute:
    """The routing state of one call over a fleet; see the module docstring.

    Example::

        route = CallRoute(state, session=None)
        pick = route.pick(now)
    """

    __slots__ = ("_hedged", "_model", "_round", "session", "state")

    def __init__(self, state: FleetState, *, session: str | None) -> None:
        self.state = state
        self.session = session
        """The conversation's key: its calls prefer one replica (prefix-cache affinity)."""
        self._round: list[EndpointState] = []  # tried in this round, in order
        self._model: str | None = None  # set once output arrived: a resume stays on it
        self._hedged = False

    @property
    def hedged(self) -> bool:
        """True once this call sent a hedge."""
        return self._hedged

    def pick(self, now: float) -> Pick | float:
        """The endpoint of the next request, or seconds until one may have room.

        Endpoints this round already tried are left out while another remains; once
        every one was tried a new round starts (the retry policy's backoff came first).
        """
        state = self.state
        chosen = state.choose(now, session=self.session, tried=self._round, model=self._model)
        if isinstance(chosen, float) and self._round:
            self._round.clear()
            chosen = state.choose(now, session=self.session, model=self._model)
        return chosen

    def has_untried(self, now: float) -> bool:
        """Whether another endpoint is left in this round (a move needs no backoff)."""
        chosen = self.state.choose(now, session=self.session, tried=self._round, model=self._model)
        return not isinstance(chosen, float)

    def new_round(self) -> None:
        """The retry policy waited: every endpoint may be tried again."""
        self._round.clear()

    def started(self, pick: Pick, now: float) -> AttemptTicket:
        """A request goes to ``pick``: count it in flight there."""
        self._round.append(pick.endpoint)
        return self.state.started(pick, now)

    def answering(self, ticket: AttemptTicket) -> None:
        """Output arrived from ``ticket``'s endpoint: a resume stays on its model."""
        self._model = ticket.endpoint.model

    def hedge_delay(self, now: float) -> float | None:
        """Seconds after a request is sent when a hedge is due (None: no hedge)."""
        if self._hedged:
            return None
        model = self._model
        if model is None and self._round:
            model = self._round[-1].model
        return self.state.hedge_delay(model, now) if model is not None else None

    def hedge(self, now: float, current: EndpointState | None) -> Pick | None:
        """The endpoint for a hedge beside ``current``, if the hedge budget allows one."""
        if self._hedged:
            return None
        tried = [e for e in self._round if e is not current]
        if current is not None:
            tried.append(current)
        chosen = self.state.choose(
            now,
            session=None,
            tried=tried,
            model=current.model if current is not None else None,
        )
        if isinstance(chosen, float) or chosen.endpoint is current:
            return None
        if not self.state.take_hedge(now):
            return None
        self._hedged = True
        return chosen
