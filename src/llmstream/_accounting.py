"""The token account of one call (sans-IO): plan before sending, meter while streaming,
settle at the end.

The I/O shells count the prompt (locally, or with vLLM's ``POST /tokenize``),
reserve on a shared :class:`~llmstream.TokenBudget` (waiting if asked), then
hand this account to the session, which feeds it every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._budget import CallBudget, CallPlan, CompletionMeter, exhausted_error
from ._chunks import ChatCompletionChunk, ChunkChoice
from ._errors import BudgetExceeded
from ._prompt_count import TokenCounter
from ._result import StreamResult
from ._token_budget import Reservation, TokenBudget

__all__ = ["BudgetOptions", "CallAccount", "PromptCounting"]

PromptCounting = Literal["estimate", "server"] | TokenCounter
"""How to count a prompt before sending: a conservative local estimate, exactly
with vLLM's ``POST /tokenize``, or with your own counter (a tiktoken or Hugging
Face tokenizer wrapped by :func:`~llmstream.counter_from_text_tokenizer`)."""


@dataclass(frozen=True)
class BudgetOptions:
    """The budget settings of a call (all optional).

    Example::

        BudgetOptions(budget=CallBudget(total_tokens=2_000), shared=user_budget, wait=True)
    """

    budget: CallBudget | None = None
    shared: TokenBudget | None = None
    wait: bool = False
    count_prompt: PromptCounting = "estimate"

    @property
    def planned(self) -> bool:
        """True when the call is planned before sending: a budget, or an exact prompt count.

        A conservative estimate alone never refuses a call: it could refuse
        one that fits.
        """
        return self.budget is not None or self.shared is not None or self.count_prompt != "estimate"


class CallAccount:
    """Meters one call against its plan and settles its shared reservation once.

    Completion tokens are counted per request and summed: a resumed call pays
    for each request it made. When the server sent usage, its numbers win.

    Two questions stop a stream at its budget. Before a chunk is delivered,
    :meth:`refuses`: does it carry output past the budget? (A server that
    ignores ``max_tokens``: the chunk is not delivered.) After it was
    observed, :attr:`must_stop`: did the answer reach a budget that nothing
    on the server's side enforces? A request whose ``max_tokens`` keeps the
    answer within the budget is never cut at the budget itself: the server
    stops there, and OpenAI and llama.cpp send the finish reason and the usage
    in chunks of their own after the last token.

    Example::

        account = CallAccount(plan, reservation)
        if account.refuses(chunk): ...  # stop, without delivering chunk
        account.observe(chunk, output=True)
        if account.must_stop: ...  # stop, after delivering chunk
        account.settle(sent=True)
    """

    __slots__ = (
        "_charge_before",
        "_choices",
        "_completion_before",
        "_meter",
        "_settled",
        "plan",
        "reservation",
    )

    def __init__(self, plan: CallPlan, reservation: Reservation | None) -> None:
        self.plan = plan
        self.reservation = reservation
        self._meter = CompletionMeter()
        # Earlier requests of this call (resumes): their completion tokens count against the
        # budget, their prompt and completion tokens are charged.
        self._completion_before = 0
        self._charge_before = 0
        self._choices = 1  # choices seen so far: a lower bound on the request's n
        self._settled = False

    def observe(self, chunk: ChatCompletionChunk, output: bool) -> None:
        """Take in one chunk (after it was assembled)."""
        usage = chunk.usage
        if not chunk.choices:
            if usage is not None:
                self._meter.final_usage(usage.prompt_tokens, usage.completion_tokens)
            return
        choice = chunk.choices[0]
        if choice.index >= self._choices:
            self._choices = choice.index + 1
        self._meter.observe(
            usage.completion_tokens if usage is not None else None,
            output or choice.finish_reason is not None,
            choice=choice.index,
            usage_prompt_tokens=usage.prompt_tokens if usage is not None else None,
        )

    @property
    def final(self) -> bool:
        """True once the server's final usage arrived (exact numbers)."""
        return self._meter.final

    @property
    def used(self) -> int:
        """Completion tokens so far, all requests of the call."""
        return self._completion_before + self._meter.used

    @property
    def must_stop(self) -> bool:
        """True when the answer reached its budget and only the client can stop it there.

        False while the request's ``max_tokens`` keeps the answer within the
        budget (:meth:`~llmstream._budget.CallPlan.server_limit`): the server
        stops on its own, and :meth:`refuses` cuts one that does not.
        """
        limit = self.plan.completion_limit
        return (
            limit is not None
            and self.used >= limit
            and self.plan.server_limit(self._choices) is None
        )

    def refuses(self, chunk: ChatCompletionChunk) -> bool:
        """True when ``chunk``, not yet observed, carries output past the budget.

        With ``max_tokens`` within the budget, that is output for a choice that
        already has ``max_tokens`` tokens: the server ignores ``max_tokens``.
        Otherwise it is any output once the budget is reached. A finish or usage
        chunk is never refused: it brings no output, and it ends the answer.
        """
        limit = self.plan.completion_limit
        if limit is None or not chunk.choices:
            return False
        choices = max(self._choices, max(choice.index for choice in chunk.choices) + 1)
        cap = self.plan.server_limit(choices)
        if cap is None:
            return self.used >= limit and any(_has_output(c) for c in chunk.choices)
        return any(
            self._completion_before + self._meter.used_by(c.index) >= cap and _has_output(c)
            for c in chunk.choices
        )

    def exhausted_error(self, partial: StreamResult) -> BudgetExceeded:
        """The error for ``on_exhausted="error"``."""
        return exhausted_error(self.plan, self.used, partial=partial)

    def new_request(self) -> None:
        """A resumed call sends another request: what this one used stays counted."""
        self._completion_before += self._meter.used
        self._charge_before += self._meter.tokens_to_charge(self.plan.prompt_tokens)
        self._meter = CompletionMeter()

    def lost_request(self) -> None:
        """A request of the call was cut before any output (a hedge race's loser).

        Its server had read the prompt: its prompt tokens are charged, as vLLM prefilled
        them. What it generated after its last byte reached us is unknown, and was nothing
        the caller received.
        """
        self._charge_before += self.plan.prompt_tokens

    def tokens_to_charge(self) -> int:
        """Prompt and completion tokens of every request of the call."""
        return self._charge_before + self._meter.tokens_to_charge(self.plan.prompt_tokens)

    def settle(self, *, sent: bool) -> None:
        """Charge what the call used (or release, if nothing reached the server). Once."""
        if self._settled or self.reservation is None:
            self._settled = True
            return
        self._settled = True
        if sent:
            self.reservation.charge(self.tokens_to_charge())
        else:
            self.reservation.release()


def _has_output(choice: ChunkChoice) -> bool:
    # The assembler's rule (StreamAssembler._add_choice): text, reasoning or a tool call.
    delta = choice.delta
    return bool(delta.content or delta.reasoning or delta.reasoning_content or delta.tool_calls)
