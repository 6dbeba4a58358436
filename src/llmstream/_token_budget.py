"""A token budget shared by many calls, across threads and tasks (sans-IO).

:class:`TokenBudget` hands out :class:`Reservation` s and keeps exact books,
optionally refilling as a token bucket. Nothing here sleeps or does I/O: time
is an argument or comes from an injected clock, and the I/O shells wait using
``BudgetExceeded.retry_after``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ._counts import require_count
from ._errors import BudgetExceeded, InvalidRequestError

__all__ = ["BudgetSnapshot", "Reservation", "TokenBudget"]


# Timestamps a hair early still count: (deficit / rate) seconds later, float rounding may give
# 0.9999999 of the last token, and a caller that slept exactly that long would wait again.
_REFILL_EPSILON: Final = 1e-9


@dataclass(frozen=True)
class BudgetSnapshot:
    """The books of a :class:`TokenBudget` at one moment, read under its lock.

    ``balance == limit + refilled - spent - reserved`` always; it goes below
    zero only when calls used more than they reserved (``overspent``).

    Example::

        snap = budget.snapshot()
        print(f"{snap.spent} spent, {snap.reserved} in flight, {snap.balance} left")
    """

    limit: int
    balance: int
    reserved: int
    spent: int
    refilled: int
    overspent: int


class Reservation:
    """Tokens set aside on a :class:`TokenBudget` for one call.

    ``amount`` is what was granted (at most ``requested``). Settle it once:
    :meth:`charge` the tokens the call used (the rest goes back), or
    :meth:`release` it all when the call never ran. Once the request was
    sent, charge even when the call fails or is cancelled: the server has
    read the prompt and generated what the stream carried. A second
    ``charge`` raises ``RuntimeError`` (a bug in the caller, and the books
    must not count twice); ``release`` after settling does nothing, so a
    ``finally: reservation.release()`` is always safe. Leaving a ``with``
    block releases an unsettled reservation.

    Example::

        with budget.reserve(1_000, minimum=100) as reservation:
            ...  # run the call with reservation.amount tokens
            reservation.charge(usage.total_tokens)
    """

    __slots__ = ("_budget", "_charged", "_settled", "amount", "requested")

    def __init__(self, budget: TokenBudget, amount: int, requested: int) -> None:
        self._budget = budget
        self.amount = amount
        self.requested = requested
        self._settled = False
        self._charged: int | None = None

    @property
    def settled(self) -> bool:
        """True once charged or released."""
        return self._settled

    @property
    def charged(self) -> int | None:
        """The tokens charged (``0`` after release), ``None`` while unsettled."""
        return self._charged

    def charge(self, actual: int) -> None:
        """Charge the tokens the call used and give the rest of the reservation back.

        Charge the true amount even when it exceeds ``amount`` (a stream
        stopped by its budget can overrun by one chunk): the books stay exact
        and the budget's balance goes below zero by the overrun, which later
        calls wait out.

        Example::

            reservation.charge(meter.tokens_to_charge(plan.prompt_tokens))
        """
        require_count("actual", actual, minimum=0)
        self._budget._settle(self, actual, release=False)

    def release(self) -> None:
        """Give the whole reservation back (the call never ran); no-op once settled.

        Example::

            except APIConnectionError:
                reservation.release()
        """
        self._budget._settle(self, 0, release=True)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = f"charged={self._charged}" if self._settled else "open"
        return f"Reservation(amount={self.amount}, requested={self.requested}, {state})"


class TokenBudget:
    """A token budget shared by many calls, across threads and tasks.

    Without refill, ``limit`` is a quota that only goes down (a user's
    allowance). With ``refill_per_window``, it is a token bucket of capacity
    ``limit`` that refills ``refill_per_window`` tokens every ``window``
    seconds, continuously (a tenant's tokens per minute). A token bucket
    rather than a fixed window: a fixed window lets a burst at the end of one
    window and the start of the next spend twice the rate, and the wait for
    ``n`` tokens is a plain division instead of "until the next boundary".

    Calls :meth:`reserve` before sending and settle the :class:`Reservation`
    at the end. Reserved tokens count as taken: the bucket refills only up to
    ``limit`` minus what is in flight, so the books always satisfy
    ``spent + reserved <= limit + refilled`` (plus ``overspent``, what calls
    used beyond their reservations). All methods take a ``threading.Lock``
    and never wait inside it; times are seconds on ``clock``, or ``now`` given
    on that same clock. Nothing here sleeps: the I/O shells do, using
    ``BudgetExceeded.retry_after`` or :meth:`seconds_until_available`.

    Example::

        budget = TokenBudget(100_000, refill_per_window=100_000, window=60.0)
        reservation = budget.reserve(2_000, minimum=600)
        reservation.charge(1_234)
    """

    def __init__(
        self,
        limit: int,
        *,
        refill_per_window: int | None = None,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        require_count("limit", limit)
        if refill_per_window is not None:
            require_count("refill_per_window", refill_per_window)
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise InvalidRequestError(f"window must be a number of seconds, got {window!r}")
        if not 0 < window < math.inf:
            raise InvalidRequestError(
                f"window must be a finite number of seconds > 0, got {window!r}"
            )
        self._limit = limit
        self._refill_per_window = refill_per_window
        self._window = float(window)
        self._rate = None if refill_per_window is None else refill_per_window / self._window
        self._clock = clock
        self._lock = threading.Lock()
        self._level = limit  # what can be reserved now; below zero after an overrun
        self._reserved = 0
        self._spent = 0
        self._refilled = 0
        self._overspent = 0
        self._carry = 0.0  # the fraction of a token refilled but not yet whole
        self._updated_at = clock()

    @property
    def limit(self) -> int:
        """The quota, or the bucket's capacity when it refills."""
        return self._limit

    @property
    def refill_per_window(self) -> int | None:
        """Tokens added back every ``window`` seconds (``None``: never refills)."""
        return self._refill_per_window

    @property
    def window(self) -> float:
        """The refill window, in seconds."""
        return self._window

    def snapshot(self, now: float | None = None) -> BudgetSnapshot:
        """The books at one moment, consistent with each other.

        Example::

            budget.snapshot().balance
        """
        with self._lock:
            self._refill(self._clock() if now is None else now)
            return BudgetSnapshot(
                limit=self._limit,
                balance=self._level,
                reserved=self._reserved,
                spent=self._spent,
                refilled=self._refilled,
                overspent=self._overspent,
            )

    @property
    def balance(self) -> int:
        """Tokens that can be reserved now (negative after an overrun, until refilled)."""
        return self.snapshot().balance

    @property
    def reserved(self) -> int:
        """Tokens held by reservations not yet settled."""
        return self.snapshot().reserved

    @property
    def spent(self) -> int:
        """Tokens charged so far: exactly the sum of every ``charge``."""
        return self.snapshot().spent

    def reserve(
        self, amount: int, *, minimum: int | None = None, now: float | None = None
    ) -> Reservation:
        """Set aside up to ``amount`` tokens, and at least ``minimum``.

        ``minimum`` defaults to ``amount`` (all or nothing). With a smaller
        minimum, the reservation takes what is available up to ``amount``: a
        call reserves prompt + ``max_tokens`` with minimum prompt + 1, then
        sends ``max_tokens = reservation.amount - prompt``. When not even
        ``minimum`` is available, raises :class:`BudgetExceeded` with
        ``retry_after``: the seconds until refill covers it (``None`` when
        it never will: no refill, or more than ``limit``). There is no queue:
        a waiting large request can be overtaken by smaller ones.

        Example::

            try:
                reservation = budget.reserve(1_500, minimum=500)
            except BudgetExceeded as exc:
                time.sleep(exc.retry_after)  # when waiting is wanted and it is not None
        """
        require_count("amount", amount)
        minimum = amount if minimum is None else minimum
        require_count("minimum", minimum)
        if minimum > amount:
            raise InvalidRequestError(f"minimum ({minimum}) must not exceed amount ({amount})")
        with self._lock:
            self._refill(self._clock() if now is None else now)
            if self._level < minimum:
                raise self._refusal(minimum)
            granted = min(amount, self._level)
            self._level -= granted
            self._reserved += granted
        return Reservation(self, granted, amount)

    def seconds_until_available(self, amount: int, now: float | None = None) -> float:
        """Seconds until refill alone makes ``amount`` tokens available.

        ``0.0`` when they are available now, ``math.inf`` when refill never
        will. Reservations still in flight can make it sooner (they give back
        what they did not use) or later (the bucket cannot refill over them):
        check again after sleeping.

        Example::

            await anyio.sleep(budget.seconds_until_available(1_000))
        """
        require_count("amount", amount)
        with self._lock:
            self._refill(self._clock() if now is None else now)
            return self._wait_for(amount)

    def __repr__(self) -> str:
        snap = self.snapshot()
        refill = (
            ""
            if self._refill_per_window is None
            else f", refill_per_window={self._refill_per_window}, window={self._window}"
        )
        return (
            f"TokenBudget(limit={self._limit}{refill}, balance={snap.balance},"
            f" reserved={snap.reserved}, spent={snap.spent})"
        )

    # The methods below run with self._lock held.

    def _refill(self, now: float) -> None:
        if self._rate is None:
            return
        elapsed = now - self._updated_at
        # Threads read the clock before taking the lock, so timestamps can arrive slightly out
        # of order: an older one refills nothing rather than moving time backwards.
        if elapsed <= 0:
            return
        self._updated_at = now
        room = self._limit - self._level - self._reserved
        if room <= 0:
            self._carry = 0.0
            return
        gained = elapsed * self._rate + self._carry
        whole = math.floor(gained + _REFILL_EPSILON)
        if whole >= room:
            whole, self._carry = room, 0.0  # full: a token bucket does not bank beyond its size
        else:
            self._carry = max(0.0, gained - whole)
        self._level += whole
        self._refilled += whole

    def _wait_for(self, amount: int) -> float:
        if self._level >= amount:
            return 0.0
        if self._rate is None or amount > self._limit:
            return math.inf
        return max(0.0, (amount - self._level - self._carry) / self._rate)

    def _refusal(self, minimum: int) -> BudgetExceeded:
        wait = self._wait_for(minimum)
        books = (
            f"The shared token budget has {max(self._level, 0):,} of {self._limit:,} tokens"
            f" available ({self._reserved:,} reserved by calls in flight, {self._spent:,} spent)"
        )
        if minimum > self._limit:
            advice = f"; this call needs {minimum:,}, more than the budget can ever hold."
        elif math.isinf(wait):
            advice = f"; this call needs {minimum:,}. It does not refill: raise its limit."
        else:
            advice = (
                f"; this call needs {minimum:,}. Retry in {wait:.1f} s (it refills"
                f" {self._refill_per_window:,} tokens every {self._window:g} s)."
            )
        return BudgetExceeded(
            books + advice,
            limit="shared",
            allowed=max(self._level, 0),
            requested=minimum,
            retry_after=None if math.isinf(wait) else wait,
        )

    def _settle(self, reservation: Reservation, actual: int, *, release: bool) -> None:
        with self._lock:
            if reservation._settled:
                if release:
                    return
                raise RuntimeError(
                    f"This reservation was already settled ({reservation._charged} tokens"
                    " charged); a reservation is charged once."
                )
            # Refill first, while the reservation still holds its tokens: the bucket
            # must not depend on whether anyone happened to read it meanwhile.
            self._refill(self._clock())
            reservation._settled = True
            reservation._charged = actual
            self._reserved -= reservation.amount
            self._spent += actual
            # Unused tokens go back; an overrun is taken from the balance, which may go
            # below zero: exact books matter more than a tidy balance.
            self._level += reservation.amount - actual
            self._overspent += max(0, actual - reservation.amount)
