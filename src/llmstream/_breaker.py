"""The circuit breaker of one endpoint (pure: timestamps in, no clock, no lock).

closed -> open after ``failures`` consecutive failures; open for a cool-down that
doubles at each opening (capped at ``max_cooldown``); then half-open: ONE trial call at
a time. Its success closes the circuit, its failure opens it again. The caller (the
fleet state, under its lock) decides what counts as a failure.

Example::

    breaker = Breaker(CircuitBreaker(failures=1, cooldown=1.0))
    breaker.failed(now=0.0)
    breaker.state(0.5), breaker.state(1.0)  # "open", "half_open"
"""

from __future__ import annotations

from typing import Literal

from ._fleet_config import CircuitBreaker

__all__ = ["BreakerState", "Breaker"]

BreakerState = Literal["closed", "open", "half_open"]
"""``closed``: in rotation; ``open``: cooling down, no calls; ``half_open``: one trial call."""


class Breaker:
    """The state machine: feed it outcomes and ask whether a call may go.

    Example::

        breaker = Breaker(CircuitBreaker())
        if breaker.available(now) and breaker.admit(now):
            ...  # send; then breaker.succeeded(now) or breaker.failed(now)
    """

    __slots__ = (
        "_config",
        "_failed_probes",
        "_failures",
        "_opens",
        "_probe_opened",
        "_trial_out",
        "_trials",
        "reopens_at",
    )

    def __init__(self, config: CircuitBreaker) -> None:
        self._config = config
        self._failures = 0  # consecutive, while closed
        # Consecutive failed /health probes while closed: calls that succeed meanwhile do
        # not reset them (a server draining for shutdown still answers what it has).
        self._failed_probes = 0
        self._opens = 0  # consecutive openings without a success between
        # Opened by failed /health probes: the server says it is down, so after the
        # cool-down a probe (not a caller's call) tries it first, while probes run.
        self._probe_opened = False
        self._trial_out = False
        self._trials = 0  # trial slots handed out so far: names the one outstanding
        self.reopens_at: float | None = None
        """When the cool-down ends (``None`` while closed)."""

    def state(self, now: float) -> BreakerState:
        """``closed``, ``open`` (cooling down) or ``half_open`` (cool-down over).

        Example::

            breaker.state(time.monotonic())  # "closed"
        """
        if self.reopens_at is None:
            return "closed"
        return "open" if now < self.reopens_at else "half_open"

    def available(self, now: float) -> bool:
        """Whether a call may be sent now: closed, or half-open with the trial slot free.

        Example::

            breaker.available(now)  # False while open
        """
        state = self.state(now)
        if state == "closed":
            return True
        return state == "half_open" and not self._trial_out and not self._awaits_probe(now)

    def admit(self, now: float) -> bool:
        """Take the way in: always when closed; the one trial slot when half-open.

        Example::

            breaker.admit(now), breaker.admit(now)  # True, False when half-open
        """
        state = self.state(now)
        if state == "closed":
            return True
        if state == "open" or self._trial_out or self._awaits_probe(now):
            return False
        self._trial_out = True
        self._trials += 1
        return True

    @property
    def trial(self) -> int | None:
        """The number of the trial slot taken by the last :meth:`admit`, while it is out.

        Example::

            slot = breaker.trial if breaker.admit(now) else None
        """
        return self._trials if self._trial_out else None

    def release_trial(self, trial: int) -> None:
        """Free trial slot ``trial`` when its call ended with no verdict (cancelled, a 4xx).

        A slot already decided (and perhaps handed out again since) is left alone.

        Example::

            breaker.release_trial(slot)  # another call may now try the endpoint
        """
        if self._trial_out and trial == self._trials:
            self._trial_out = False

    def succeeded(self, now: float) -> None:
        """The endpoint served a call (first token, or a complete answer): close.

        Example::

            breaker.succeeded(now)
            breaker.state(now)  # "closed"
        """
        self._failures = 0
        self._opens = 0
        self._trial_out = False
        self.reopens_at = None

    def failed(self, now: float) -> None:
        """A call failed on the endpoint: count it when closed, reopen when half-open.

        A failure while open (a call sent before it opened) changes nothing.

        Example::

            for _ in range(3):
                breaker.failed(now)
            breaker.state(now)  # "open"
        """
        state = self.state(now)
        if state == "open":
            return
        if state == "closed":
            self._failures += 1
            if self._failures < self._config.failures:
                return
        self._open(now)

    def probed(self, ok: bool, now: float) -> None:
        """The result of a ``/health`` probe: while half-open, it closes or reopens.

        While closed, ``failures`` failed probes in a row open the circuit (a server
        whose engine died, or that is being taken out of service), even if calls still
        succeed in between. While open the cool-down runs its course whatever the probe
        says: a server that answers ``/health`` may still fail calls.

        Example::

            breaker.probed(True, now)  # closes a half-open circuit
        """
        state = self.state(now)
        if state == "closed":
            self._failed_probes = 0 if ok else self._failed_probes + 1
            if self._failed_probes >= self._config.failures:
                self._open(now, by_probe=True)
            return
        if state != "half_open" or self._trial_out:
            return
        if ok:
            self.succeeded(now)
        else:
            self._open(now, by_probe=True)

    def _awaits_probe(self, now: float) -> bool:
        # Half-open after failed probes: the next probe decides, if it comes in time (the
        # watcher probes while the client is busy); past that, a trial call may.
        if not self._probe_opened or self.reopens_at is None:
            return False
        return now < self.reopens_at + 2 * self._config.probe_interval

    def _open(self, now: float, *, by_probe: bool = False) -> None:
        self._probe_opened = by_probe
        self._opens += 1
        self._failures = 0
        self._failed_probes = 0
        self._trial_out = False
        cooldown = self._config.cooldown * 2.0 ** min(self._opens - 1, 64)
        self.reopens_at = now + min(cooldown, self._config.max_cooldown)
