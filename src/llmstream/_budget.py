"""Token budgets of one call (sans-IO): plan before sending, meter while streaming.

``max_tokens`` asks the server politely; a budget is what the application can
rely on. This module is the arithmetic only, with no I/O and no sleeping:

* :class:`CallBudget` limits one call (prompt, completion, total tokens).
* :func:`plan_call` decides before sending: refuse (:class:`BudgetExceeded`)
  or send with a clamped ``max_tokens`` (:class:`CallPlan`).
* :class:`CompletionMeter` counts completion tokens while a stream runs.

Counting the prompt is :mod:`llmstream._prompt_count` and :mod:`llmstream._tokenize`;
the budget shared by many calls is :mod:`llmstream._token_budget`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from ._counts import require_count
from ._errors import BudgetExceeded, BudgetLimit, InvalidRequestError
from ._prompt_count import PromptSource

if TYPE_CHECKING:
    from ._result import StreamResult

__all__ = [
    "CallBudget",
    "CallPlan",
    "CompletionMeter",
    "OnExhausted",
    "exhausted_error",
    "plan_call",
]

OnExhausted = Literal["stop", "error"]
"""What a stream does when its budget runs out: ``stop`` ends it with status
``"budget"``, ``error`` raises :class:`BudgetExceeded`."""

_SOURCE_WORDS: Final[Mapping[str, str]] = {
    "server": "counted by the server",
    "tokenizer": "counted by your tokenizer",
    "estimate": "estimated",
}
_ESTIMATE_HINT: Final = (
    " The count is a conservative estimate; pass a token counter or count on the server"
    " for an exact figure."
)


@dataclass(frozen=True)
class CallBudget:
    """Limits on one call, in tokens; ``None`` means no limit.

    ``prompt_tokens`` caps the prompt, ``completion_tokens`` the answer,
    ``total_tokens`` both together. ``on_exhausted`` chooses what a stream
    does when the answer reaches its limit: ``stop`` ends it cleanly with
    finish reason ``"budget"``, ``error`` raises :class:`BudgetExceeded`.

    Example::

        CallBudget(prompt_tokens=4_000, total_tokens=5_000)
        CallBudget(completion_tokens=256, on_exhausted="error")
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    on_exhausted: OnExhausted = "stop"

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = getattr(self, name)
            if value is not None:
                require_count(name, value)
        if self.on_exhausted not in ("stop", "error"):
            raise InvalidRequestError(
                f'on_exhausted must be "stop" or "error", got {self.on_exhausted!r}'
            )


# -- planning a call ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CallPlan:
    """What to send, decided by :func:`plan_call`.

    ``max_tokens`` is the value to send (``None``: nothing limits the answer,
    send none). ``limited_by`` names the limit that set it (``"max_tokens"``:
    the caller's own value was the smallest). ``completion_limit`` is the
    budget's cap on the answer, which the client enforces itself while
    streaming (``None`` when no budget applies), and ``completion_limited_by``
    the budget limit that set it.

    Example::

        plan = plan_call(CallBudget(completion_tokens=100), prompt_tokens=20,
                         prompt_source="server", max_tokens=500)
        plan.max_tokens, plan.limited_by, plan.clamped  # 100, "completion_tokens", True
    """

    prompt_tokens: int
    prompt_source: PromptSource
    max_tokens: int | None
    limited_by: BudgetLimit | None
    completion_limit: int | None
    completion_limited_by: BudgetLimit | None
    on_exhausted: OnExhausted = "stop"

    @property
    def clamped(self) -> bool:
        """True when a limit lowered (or set) ``max_tokens`` below what the caller asked."""
        return self.limited_by not in (None, "max_tokens")

    def server_limit(self, choices: int = 1) -> int | None:
        """The ``max_tokens`` at which the server itself keeps the answer within the budget.

        The server stops each choice at ``max_tokens``, so ``choices`` choices
        stay within ``completion_limit`` when ``max_tokens * choices`` does: the
        client then needs to cut only a server that goes past ``max_tokens``.
        ``None`` when nothing on the server's side holds the answer to the
        budget (no ``max_tokens``, no budget, or choices that together exceed it):
        the client cuts the stream when the budget is reached.

        Example::

            plan = plan_call(CallBudget(completion_tokens=100), prompt_tokens=20,
                             prompt_source="server")
            plan.server_limit(), plan.server_limit(choices=2)  # 100, None
        """
        sent, limit = self.max_tokens, self.completion_limit
        if sent is None or limit is None or sent * choices > limit:
            return None
        return sent


def _smallest(caps: list[tuple[BudgetLimit, int | None]]) -> tuple[int | None, BudgetLimit | None]:
    # The first of equal values wins, so ties name the caller's own value, then the budget.
    best: tuple[int | None, BudgetLimit | None] = (None, None)
    for name, value in caps:
        if value is not None and (best[0] is None or value < best[0]):
            best = (value, name)
    return best


def _prompt_words(prompt_tokens: int, source: PromptSource) -> str:
    return f"{prompt_tokens:,} tokens ({_SOURCE_WORDS[source]})"


def _check_plan_arguments(
    shared_allowance: int | None,
    prompt_tokens: int,
    prompt_source: str,
    max_tokens: int | None,
    max_model_len: int | None,
) -> None:
    require_count("prompt_tokens", prompt_tokens, minimum=0)
    if prompt_source not in _SOURCE_WORDS:
        raise InvalidRequestError(
            f'prompt_source must be "server", "tokenizer" or "estimate", got {prompt_source!r}'
        )
    if max_tokens is not None:
        require_count("max_tokens", max_tokens)
    if max_model_len is not None:
        require_count("max_model_len", max_model_len)
    if shared_allowance is not None:
        require_count("shared_allowance", shared_allowance, minimum=0)


def _check_budget(budget: CallBudget, prompt: int, source: PromptSource) -> None:
    hint = _ESTIMATE_HINT if source == "estimate" else ""
    if budget.prompt_tokens is not None and prompt > budget.prompt_tokens:
        raise BudgetExceeded(
            f"The prompt has {_prompt_words(prompt, source)}, over the budget's prompt_tokens"
            f" limit of {budget.prompt_tokens:,}. Shorten the prompt or raise"
            f" CallBudget(prompt_tokens=...).{hint}",
            limit="prompt_tokens",
            allowed=budget.prompt_tokens,
            requested=prompt,
            prompt_tokens=prompt,
        )
    # A prompt that fills the total leaves no room for a single completion token: refuse it.
    if budget.total_tokens is not None and prompt + 1 > budget.total_tokens:
        raise BudgetExceeded(
            f"The prompt has {_prompt_words(prompt, source)}, which leaves no room for an answer"
            f" within the budget's total_tokens limit of {budget.total_tokens:,} (the prompt plus"
            f" at least 1 completion token is {prompt + 1:,}). Shorten the prompt or raise"
            f" CallBudget(total_tokens=...).{hint}",
            limit="total_tokens",
            allowed=budget.total_tokens,
            requested=prompt + 1,
            prompt_tokens=prompt,
        )


def _check_context(
    max_model_len: int, prompt: int, source: PromptSource, max_tokens: int | None
) -> None:
    hint = _ESTIMATE_HINT if source == "estimate" else ""
    if prompt + 1 > max_model_len:
        # vLLM answers 400 "This model's maximum context length is N tokens..." for this.
        raise BudgetExceeded(
            f"The prompt has {_prompt_words(prompt, source)}, which leaves no room for an answer"
            f" in the model's context of {max_model_len:,} tokens (max_model_len). Shorten the"
            f" prompt.{hint}",
            limit="max_model_len",
            allowed=max_model_len,
            requested=prompt + 1,
            prompt_tokens=prompt,
        )
    if max_tokens is not None and prompt + max_tokens > max_model_len:
        # The caller asked for this many tokens explicitly: say it cannot fit rather than
        # answer with less than was asked for. (vLLM itself clamps here, and answers 400 only
        # when max_tokens alone exceeds max_model_len.)
        server_too = (
            " The server rejects max_tokens > max_model_len too."
            if max_tokens > max_model_len
            else ""
        )
        raise BudgetExceeded(
            f"max_tokens={max_tokens:,} plus the prompt's {_prompt_words(prompt, source)} is"
            f" {prompt + max_tokens:,}, over the model's context of {max_model_len:,} tokens"
            f" (max_model_len). Lower max_tokens to at most {max_model_len - prompt:,}, leave it"
            f" unset to use the room left, or shorten the prompt.{server_too}{hint}",
            limit="max_model_len",
            allowed=max_model_len,
            requested=prompt + max_tokens,
            prompt_tokens=prompt,
        )


def _check_shared(shared_allowance: int, prompt: int, source: PromptSource) -> None:
    if prompt + 1 > shared_allowance:
        raise BudgetExceeded(
            f"The shared token budget allowed {shared_allowance:,} tokens for this call, but the"
            f" prompt has {_prompt_words(prompt, source)} and the answer needs at least 1 more."
            " Wait for the budget to refill, or raise its limit.",
            limit="shared",
            allowed=shared_allowance,
            requested=prompt + 1,
            prompt_tokens=prompt,
        )


def plan_call(
    budget: CallBudget | None,
    *,
    prompt_tokens: int,
    prompt_source: PromptSource,
    shared_allowance: int | None = None,
    max_tokens: int | None = None,
    max_model_len: int | None = None,
) -> CallPlan:
    """Decide, before sending, whether a call may run and with which ``max_tokens``.

    Refuses with :class:`BudgetExceeded` when the prompt alone is over the
    budget's ``prompt_tokens``, leaves no completion token within its
    ``total_tokens``, within the model's context (``max_model_len``) or within
    ``shared_allowance`` (the tokens reserved for this call on a shared
    :class:`TokenBudget`: prompt and answer together). The caller's explicit
    ``max_tokens`` must fit the context beside the prompt, or the call is
    refused with the numbers. Otherwise ``max_tokens`` becomes the smallest of
    the caller's value, ``completion_tokens``, ``total_tokens - prompt``,
    ``shared_allowance - prompt`` and ``max_model_len - prompt``: limits the
    caller did not set clamp silently, and :attr:`CallPlan.limited_by` says which.

    Permanent refusals (budget, context) are checked before the shared
    budget, whose refusal is transient: a retry cannot fix the former.

    Example::

        plan = plan_call(CallBudget(total_tokens=1_000), prompt_tokens=900,
                         prompt_source="estimate", max_model_len=32_768)
        plan.max_tokens, plan.limited_by  # 100, "total_tokens"
    """
    _check_plan_arguments(shared_allowance, prompt_tokens, prompt_source, max_tokens, max_model_len)
    budget = budget or CallBudget()
    _check_budget(budget, prompt_tokens, prompt_source)
    if max_model_len is not None:
        _check_context(max_model_len, prompt_tokens, prompt_source, max_tokens)
    if shared_allowance is not None:
        _check_shared(shared_allowance, prompt_tokens, prompt_source)

    def room(limit: int | None) -> int | None:
        return None if limit is None else limit - prompt_tokens

    budget_caps: list[tuple[BudgetLimit, int | None]] = [
        ("completion_tokens", budget.completion_tokens),
        ("total_tokens", room(budget.total_tokens)),
        ("shared", room(shared_allowance)),
    ]
    completion_limit, completion_limited_by = _smallest(budget_caps)
    chosen, limited_by = _smallest(
        [("max_tokens", max_tokens), *budget_caps, ("max_model_len", room(max_model_len))]
    )
    return CallPlan(
        prompt_tokens=prompt_tokens,
        prompt_source=prompt_source,
        max_tokens=chosen,
        limited_by=limited_by,
        completion_limit=completion_limit,
        completion_limited_by=completion_limited_by,
        on_exhausted=budget.on_exhausted,
    )


# -- metering a stream --------------------------------------------------------------------------


class CompletionMeter:
    """Counts the completion tokens of one stream while it runs.

    With vLLM's ``stream_options.continuous_usage_stats`` every chunk carries
    ``usage.completion_tokens``, the server's running count: it is
    authoritative and can jump by several tokens in one chunk (merged engine
    steps, speculative decoding). Without it, each output chunk counts one
    token (vLLM sends about one a chunk). When the final usage chunk arrives,
    :meth:`final_usage` replaces everything with the exact numbers. Meant for
    one stream read by one consumer: it has no lock.

    Example::

        meter = CompletionMeter()
        meter.observe(None, output_chunk=True)
        meter.observe(5, output_chunk=True)   # the server's count wins
        meter.used, meter.source               # 5, "server"
    """

    __slots__ = ("_counted", "_final", "_server_prompt", "_since")

    def __init__(self) -> None:
        # Per choice: vLLM's running count is per choice (previous_num_tokens[i]), and the
        # output chunks seen since that choice's last count. The final usage sums them all.
        self._counted: dict[int, int] = {}
        self._since: dict[int, int] = {}
        self._final: int | None = None
        self._server_prompt: int | None = None

    def observe(
        self,
        usage_completion_tokens: int | None,
        output_chunk: bool,
        *,
        choice: int = 0,
        usage_prompt_tokens: int | None = None,
    ) -> None:
        """Take in one chunk of choice ``choice``.

        ``usage_completion_tokens`` is ``chunk.usage.completion_tokens`` when
        the chunk has usage (continuous usage stats), else ``None``;
        ``output_chunk`` is true for a chunk that carries generated output or a
        finish reason (the finish chunk carries the last token, or the EOS
        token, which vLLM counts). ``usage_prompt_tokens`` is the server's
        prompt count, when the chunk has one. Ignored after :meth:`final_usage`.

        Example::

            meter.observe(chunk.usage.completion_tokens if chunk.usage else None,
                          output_chunk=True, choice=chunk.choices[0].index)
        """
        if self._final is not None:
            return
        if usage_prompt_tokens is not None:
            self._server_prompt = usage_prompt_tokens
        if usage_completion_tokens is not None:
            # The count already includes this chunk's tokens.
            self._counted[choice] = usage_completion_tokens
            self._since[choice] = 0
        elif output_chunk:
            self._since[choice] = self._since.get(choice, 0) + 1

    def final_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The final usage chunk arrived: its exact numbers replace the running count.

        Example::

            meter.final_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        """
        self._server_prompt = prompt_tokens
        self._final = completion_tokens

    @property
    def used(self) -> int:
        """Completion tokens so far: exact after :meth:`final_usage`, else the running count."""
        if self._final is not None:
            return self._final
        return sum(self._counted.values()) + sum(self._since.values())

    @property
    def source(self) -> Literal["server", "chunks"]:
        """``server`` once the server has counted, ``chunks`` while counting output chunks."""
        return "server" if self._final is not None or self._counted else "chunks"

    @property
    def final(self) -> bool:
        """True once the final usage has arrived."""
        return self._final is not None

    def used_by(self, choice: int) -> int:
        """Completion tokens of one choice so far (the running count; the final usage has no
        per-choice numbers).

        Example::

            meter.used_by(0)
        """
        return self._counted.get(choice, 0) + self._since.get(choice, 0)

    @property
    def server_prompt_tokens(self) -> int | None:
        """The server's prompt count, when a chunk carried usage."""
        return self._server_prompt

    def exhausted(self, limit: int | None) -> bool:
        """True when ``used`` has reached ``limit`` (never for ``None``).

        Example::

            if meter.exhausted(plan.completion_limit):
                ...  # stop the stream
        """
        return limit is not None and self.used >= limit

    def tokens_to_charge(self, prompt_tokens: int) -> int:
        """Prompt plus completion tokens this call used, for :meth:`Reservation.charge`.

        The server's prompt count wins over ``prompt_tokens`` (the count the
        call was planned with) whenever a chunk carried one.

        Example::

            reservation.charge(meter.tokens_to_charge(plan.prompt_tokens))
        """
        prompt = self._server_prompt if self._server_prompt is not None else prompt_tokens
        return prompt + self.used


def exhausted_error(
    plan: CallPlan, used: int, *, partial: StreamResult | None = None
) -> BudgetExceeded:
    """The error a stream raises when it reaches its budget with ``on_exhausted="error"``.

    Example::

        if meter.exhausted(plan.completion_limit) and plan.on_exhausted == "error":
            raise exhausted_error(plan, meter.used, partial=result)
    """
    limit = plan.completion_limit if plan.completion_limit is not None else used
    name: BudgetLimit = plan.completion_limited_by or "completion_tokens"
    return BudgetExceeded(
        f"The answer reached its budget of {limit:,} completion tokens (set by {name}) after"
        f" {used:,} tokens, and the stream was stopped. Raise the limit, or pass"
        ' on_exhausted="stop" to end the stream without an error.',
        limit=name,
        allowed=limit,
        requested=used,
        prompt_tokens=plan.prompt_tokens,
        partial=partial,
    )
