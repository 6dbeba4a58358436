"""Token budgets: what one call, and many calls together, may spend (sans-IO).

``max_tokens`` asks the server politely; a budget is what the application can
rely on. This module is the arithmetic only, with no I/O and no sleeping:

* :class:`CallBudget` limits one call (prompt, completion, total tokens).
* :func:`estimate_prompt_tokens`, :func:`counter_from_text_tokenizer` and the
  ``/tokenize`` body helpers count a prompt before it is sent.
* :func:`plan_call` decides before sending: refuse (:class:`BudgetExceeded`)
  or send with a clamped ``max_tokens`` (:class:`CallPlan`).
* :class:`CompletionMeter` counts completion tokens while a stream runs.
* :class:`TokenBudget` is shared by many calls across threads and tasks: it
  hands out :class:`Reservation` s and keeps exact books, optionally refilling
  as a token bucket. Time is an argument or comes from an injected clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, TypeGuard

from ._errors import InvalidRequestError, LLMStreamError, ProtocolError

if TYPE_CHECKING:
    from ._result import StreamResult

__all__ = [
    "BUDGET_FINISH_REASON",
    "BudgetExceeded",
    "BudgetLimit",
    "BudgetSnapshot",
    "CallBudget",
    "CallPlan",
    "CompletionMeter",
    "OnExhausted",
    "PromptCount",
    "PromptSource",
    "Reservation",
    "TokenBudget",
    "TokenCounter",
    "count_prompt_tokens",
    "counter_from_text_tokenizer",
    "estimate_prompt_tokens",
    "exhausted_error",
    "parse_tokenize_max_model_len",
    "parse_tokenize_response",
    "plan_call",
    "tokenize_request_body",
]

OnExhausted = Literal["stop", "error"]
"""What a stream does when its budget runs out: ``stop`` ends it with
:data:`BUDGET_FINISH_REASON`, ``error`` raises :class:`BudgetExceeded`."""

PromptSource = Literal["server", "tokenizer", "estimate"]
"""Where a prompt count came from: vLLM's ``POST /tokenize``, the caller's own
tokenizer, or :func:`estimate_prompt_tokens`."""

BudgetLimit = Literal[
    "max_tokens", "prompt_tokens", "completion_tokens", "total_tokens", "max_model_len", "shared"
]
"""Which limit decided: the caller's ``max_tokens``, a :class:`CallBudget`
field, the model's context length, or a shared :class:`TokenBudget`."""

TokenCounter = Callable[[list[Mapping[str, object]]], int]
"""Counts the prompt tokens of a list of chat messages.

Example::

    def count(messages: list[Mapping[str, object]]) -> int:
        return len(my_tokenizer.encode(render_chat(messages)))
"""

BUDGET_FINISH_REASON: Final = "budget"
"""The finish reason of a stream the client ended because its budget ran out."""

_SOURCE_WORDS: Final[Mapping[str, str]] = {
    "server": "counted by the server",
    "tokenizer": "counted by your tokenizer",
    "estimate": "estimated",
}
_ESTIMATE_HINT: Final = (
    " The count is a conservative estimate; pass a token counter or count on the server"
    " for an exact figure."
)


class BudgetExceeded(LLMStreamError):
    """A token budget does not allow the call, or ran out while it streamed.

    ``limit`` names the limit that decided (:data:`BudgetLimit`), ``allowed`` is
    that limit in tokens (for a shared budget: what it had available),
    ``requested`` what the call needed, ``prompt_tokens`` the prompt count used
    (when known), and ``retry_after`` the seconds until a refilling shared budget
    can cover the request (``None``: waiting will not help). Raised before
    sending, or mid-stream with ``partial`` when ``on_exhausted="error"``.

    Example::

        try:
            plan = plan_call(CallBudget(total_tokens=100), prompt_tokens=120,
                             prompt_source="server")
        except BudgetExceeded as exc:
            print(exc.limit, exc.allowed, exc.requested)  # total_tokens 100 121
    """

    def __init__(
        self,
        message: str,
        *,
        limit: BudgetLimit,
        allowed: int,
        requested: int,
        prompt_tokens: int | None = None,
        retry_after: float | None = None,
        partial: StreamResult | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.limit: BudgetLimit = limit
        self.allowed = allowed
        self.requested = requested
        self.prompt_tokens = prompt_tokens
        self.retry_after = retry_after


def _is_count(value: object, minimum: int) -> TypeGuard[int]:
    # bool is an int subclass; True tokens is a bug in the caller's code, not a count.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _require_count(name: str, value: object, minimum: int = 1) -> None:
    if not _is_count(value, minimum):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}")


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
                _require_count(name, value)
        if self.on_exhausted not in ("stop", "error"):
            raise InvalidRequestError(
                f'on_exhausted must be "stop" or "error", got {self.on_exhausted!r}'
            )


# -- counting a prompt --------------------------------------------------------------------------

_BYTES_PER_TOKEN: Final = 3
_TOKENS_PER_MESSAGE: Final = 4
_REPLY_PRIMING: Final = 3


def _text_tokens(text: str) -> int:
    # English runs at about 4 characters a token with GPT, Llama and Qwen vocabularies, so 3
    # bytes a token overestimates prose by about a third. UTF-8 bytes rather than characters:
    # a CJK character is 3 bytes and often a token of its own, which characters / 3 would
    # count as a third. Digits count one each: Qwen's and Llama 2's tokenizers split numbers
    # into single digits, which bytes / 3 would undercount.
    digits = sum(ch.isdigit() for ch in text)
    rest = len(text.encode("utf-8", "replace")) - digits
    return digits + -(-rest // _BYTES_PER_TOKEN)


def _texts(value: object) -> list[str]:
    """Every string a message holds (content, content parts, names, tool-call arguments)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _texts(item)]
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [text for item in value for text in _texts(item)]
    if value is None or isinstance(value, bool):
        return []
    return [str(value)]


def estimate_prompt_tokens(
    messages: Sequence[Mapping[str, object]],
    *,
    tools: Sequence[Mapping[str, object]] | None = None,
) -> int:
    """A deliberately conservative prompt count, without a tokenizer.

    The rule: for each message, every string it holds (role, content, content
    parts, names, tool-call arguments) counts ``ceil(bytes / 3)`` tokens of its
    UTF-8 text, plus one per digit, plus 4 for the chat template's framing of
    the message; plus 3 for the reply's opening. ``tools`` schemas count like a
    message. Conservative because a budget must rather refuse a prompt that
    would have fitted than let through one that does not: prose is
    overestimated by about a third.

    Limits: it cannot see text a chat template adds on its own (Qwen2.5 adds a
    default system prompt: "Hi" is 30 tokens on the server, 10 here), and inline
    images count by the size of their base64 text. Count on the server or with
    the model's tokenizer when that matters.

    Example::

        estimate_prompt_tokens([{"role": "user", "content": "Hello there"}])  # 13
    """
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE + sum(_text_tokens(text) for text in _texts(message))
    if tools:
        total += _TOKENS_PER_MESSAGE + sum(_text_tokens(text) for text in _texts(list(tools)))
    return total


def counter_from_text_tokenizer(
    encode: Callable[[str], Sequence[int]],
    *,
    tokens_per_message: int = _TOKENS_PER_MESSAGE,
    reply_priming: int = _REPLY_PRIMING,
) -> TokenCounter:
    """Make a :data:`TokenCounter` from a text tokenizer's ``encode``.

    Each message counts the tokens of its strings plus ``tokens_per_message``
    for the template's framing, plus ``reply_priming`` once: the accounting
    OpenAI documents for its chat models. Any ``encode(str) -> list of ids``
    works: tiktoken's ``enc.encode``, a Hugging Face tokenizer's ``encode``
    (which adds a BOS token to every string: a few tokens too many, the safe
    side). For the exact count, render the chat template yourself; a function
    over the messages is a :data:`TokenCounter` too.

    Example::

        enc = tiktoken.get_encoding("o200k_base")
        count = counter_from_text_tokenizer(enc.encode)
        count([{"role": "user", "content": "Hi"}])  # tokens of "user" and "Hi", + 4 + 3
    """
    _require_count("tokens_per_message", tokens_per_message, minimum=0)
    _require_count("reply_priming", reply_priming, minimum=0)

    def count(messages: list[Mapping[str, object]]) -> int:
        total = reply_priming
        for message in messages:
            total += tokens_per_message + sum(len(encode(text)) for text in _texts(message))
        return total

    return count


@dataclass(frozen=True)
class PromptCount:
    """A prompt's token count and where it came from.

    Example::

        PromptCount(tokens=30, source="server")
    """

    tokens: int
    source: PromptSource


def count_prompt_tokens(
    messages: Sequence[Mapping[str, object]], counter: TokenCounter | None = None
) -> PromptCount:
    """Count a prompt with the caller's counter, or estimate it without one.

    The counter's answer is checked, since it is the caller's code:
    anything but an integer >= 0 raises ``InvalidRequestError``.

    Example::

        count_prompt_tokens(messages).source              # "estimate"
        count_prompt_tokens(messages, my_counter).source  # "tokenizer"
    """
    if counter is None:
        return PromptCount(estimate_prompt_tokens(messages), "estimate")
    tokens = counter(list(messages))
    if not _is_count(tokens, 0):
        raise InvalidRequestError(f"The token counter must return an integer >= 0, got {tokens!r}")
    return PromptCount(tokens, "tokenizer")


def tokenize_request_body(
    model: str | None,
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, object]] | None = None,
    chat_template_kwargs: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The JSON body of vLLM's ``POST /tokenize`` for a chat prompt.

    Pass the same template options as the chat request (tools and template
    arguments change the rendered prompt), so the count is the one the
    server will see. ``continue_final_message`` needs
    ``add_generation_prompt=False``, as in the chat request.

    Example::

        body = tokenize_request_body("Qwen/Qwen2.5-0.5B-Instruct", messages)
        count = parse_tokenize_response(http.post(base + "/tokenize", json=body).json())
    """
    if add_generation_prompt and continue_final_message:
        # vLLM's TokenizeChatRequest rejects both with a 400; say so before sending.
        raise InvalidRequestError(
            "continue_final_message=True needs add_generation_prompt=False "
            "(the server rejects both together)."
        )
    body: dict[str, object] = {
        "messages": list(messages),
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
    }
    if model is not None:
        body["model"] = model
    if tools is not None:
        body["tools"] = list(tools)
    if chat_template_kwargs is not None:
        body["chat_template_kwargs"] = dict(chat_template_kwargs)
    return body


def _describe(body: object) -> str:
    text = repr(body)
    return text if len(text) <= 200 else text[:200] + "..."


def parse_tokenize_response(body: object) -> int:
    """The exact prompt token count from ``POST /tokenize``'s JSON body.

    vLLM answers ``{"count", "max_model_len", "tokens": [...]}``. A body
    without an integer ``count`` raises :class:`~llmstream.ProtocolError`
    (a server that is not vLLM, or a proxy's error page).

    Example::

        parse_tokenize_response({"count": 30, "max_model_len": 32768, "tokens": [...]})  # 30
    """
    count = body.get("count") if isinstance(body, Mapping) else None
    if not _is_count(count, 0):
        raise ProtocolError(
            "POST /tokenize answered without an integer 'count' (is this a vLLM server?); "
            f"got {_describe(body)}. Count with a tokenizer or use the estimate instead."
        )
    return count


def parse_tokenize_max_model_len(body: object) -> int | None:
    """The model's context length from ``POST /tokenize``'s JSON body, if it says.

    Example::

        parse_tokenize_max_model_len({"count": 30, "max_model_len": 32768})  # 32768
    """
    value = body.get("max_model_len") if isinstance(body, Mapping) else None
    return value if _is_count(value, 1) else None


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
    _require_count("prompt_tokens", prompt_tokens, minimum=0)
    if prompt_source not in _SOURCE_WORDS:
        raise InvalidRequestError(
            f'prompt_source must be "server", "tokenizer" or "estimate", got {prompt_source!r}'
        )
    if max_tokens is not None:
        _require_count("max_tokens", max_tokens)
    if max_model_len is not None:
        _require_count("max_model_len", max_model_len)
    if shared_allowance is not None:
        _require_count("shared_allowance", shared_allowance, minimum=0)


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


# -- a budget shared by many calls -------------------------------------------------------------

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
        _require_count("actual", actual, minimum=0)
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
        _require_count("limit", limit)
        if refill_per_window is not None:
            _require_count("refill_per_window", refill_per_window)
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
        _require_count("amount", amount)
        minimum = amount if minimum is None else minimum
        _require_count("minimum", minimum)
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
        _require_count("amount", amount)
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
