"""The keyword arguments of ``client.stream()``: typed, checked, and split by where they go.

Sampling parameters vLLM accepts go into the JSON body; ``extra_body`` carries anything
else the server understands, ``extra_headers`` per-call headers (as openai-python's
arguments of the same names do); the rest configure the call itself (flow control,
deadlines, retries, budgets). A keyword that is none of these is refused before anything
is sent, with the closest name: a typo such as ``max_token=5`` would otherwise reach vLLM
as an unknown field, which it ignores.

Example::

    client.stream("Hi", max_tokens=64, stop=["\\n\\n"], extra_body={"top_k": 20})
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Literal

import tenacity
from pydantic import BaseModel
from typing_extensions import TypedDict

from ._accounting import PromptCounting
from ._budget import CallBudget
from ._deadlines import Timeouts
from ._errors import InvalidRequestError
from ._flow import OnFull
from ._hooks import Hook
from ._request import Message
from ._retry import RetryPolicy
from ._token_budget import TokenBudget

__all__ = [
    "BODY_PARAMS",
    "CALL_OPTIONS",
    "SamplingParams",
    "StreamParams",
    "check_budget_settings",
    "check_params",
    "require_flag",
]

JSONObject = Mapping[str, object]


class SamplingParams(TypedDict, total=False):
    """What the model is asked to do: the body fields vLLM's chat endpoint accepts.

    OpenAI's sampling parameters and the vLLM extensions most used with it; anything
    else goes in ``extra_body``. ``None`` is the same as not passing one: the server's
    default applies.

    Example::

        client.stream("Hi", temperature=0.2, top_p=0.9, seed=7, stop=["END"])
    """

    model: str | None
    max_tokens: int | None
    max_completion_tokens: int | None
    temperature: float | None
    top_p: float | None
    n: int | None
    stop: str | Sequence[str] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[str, float] | None
    logprobs: bool | None
    top_logprobs: int | None
    tools: Sequence[JSONObject] | None
    tool_choice: str | JSONObject | None
    parallel_tool_calls: bool | None
    # A pydantic model class is sent as its JSON schema (response_format_for).
    response_format: JSONObject | type[BaseModel] | None
    reasoning_effort: Literal["low", "medium", "high"] | None
    user: str | None
    stream_options: JSONObject | None
    # vLLM's own sampling parameters.
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    min_tokens: int | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool | None
    chat_template_kwargs: JSONObject | None
    add_generation_prompt: bool | None
    continue_final_message: bool | None
    priority: int | None


class StreamParams(SamplingParams, total=False):
    """Every keyword of ``client.stream()`` after the prompt.

    Besides the sampling parameters: ``messages`` (instead of the positional prompt),
    ``extra_body`` (merged into the JSON body), ``extra_headers`` (sent with this call;
    an ``Authorization`` here replaces the client's for this call only), and the call's
    own settings, which override the client's for this call, and ``hooks``, which
    are added to the client's for this call (never sent). ``session`` is the
    conversation's key over a :class:`~llmstream.Fleet`: its calls stay on the replica
    that has its prefix cached (never sent; without a fleet it is ignored).

    Example::

        client.stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=32,
                      extra_body={"top_k": 20}, extra_headers={"X-Session-ID": "abc"},
                      timeout=llmstream.Timeouts(total=30))
    """

    messages: Sequence[Message] | None
    extra_body: JSONObject | None
    extra_headers: Mapping[str, str] | None
    buffer: int | None
    on_full: OnFull | None
    max_pause: float | None
    max_chunks: int | None
    max_bytes: int | None
    timeout: float | Timeouts | None
    retry: RetryPolicy | int | tenacity.BaseRetrying | None
    budget: CallBudget | None
    token_budget: TokenBudget | None
    budget_wait: bool | None
    count_prompt: PromptCounting | None
    hooks: Sequence[Hook] | None
    session: str | None


BODY_PARAMS = frozenset(SamplingParams.__annotations__)
"""Keywords that become body fields."""
CALL_OPTIONS = frozenset(StreamParams.__annotations__) - BODY_PARAMS
"""Keywords that configure the call (and ``messages``, ``extra_body``, ``extra_headers``)."""
_KNOWN = BODY_PARAMS | CALL_OPTIONS
# The named ways of counting a prompt (PromptCounting); anything else must be a counter.
_PROMPT_COUNTINGS = ("estimate", "server")


def check_params(params: Mapping[str, object]) -> None:
    """Refuse keywords ``stream()`` does not take, naming the closest one.

    Example::

        check_params({"max_token": 5})  # InvalidRequestError: ... did you mean max_tokens?
    """
    if "stream" in params:
        raise InvalidRequestError(
            "stream cannot be passed: the client sets it (stream=True is what it is for)."
        )
    unknown = sorted(set(params) - _KNOWN)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(_KNOWN), n=1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise InvalidRequestError(
        f"stream() got unknown keyword argument(s): {', '.join(hints)}. Pass other body "
        'fields the server accepts in extra_body={...}, e.g. extra_body={"top_k": 20}; '
        "per-call headers in extra_headers={...}."
    )


def _given(value: object) -> str:
    """What a caller passed, for a message: a short value as written, else its type."""
    if isinstance(value, bool | int | float | str) and len(repr(value)) <= 40:
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def require_flag(name: str, value: object) -> None:
    """Raise ``InvalidRequestError`` unless ``value`` is ``True`` or ``False``.

    A string such as ``"no"`` is truthy: taken as it is, it would mean the opposite.

    Example::

        require_flag("budget_wait", "yes")  # InvalidRequestError: ... got str 'yes'
    """
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be True or False (a bool), got {_given(value)}.")


def check_budget_settings(settings: Mapping[str, object]) -> None:
    """Refuse a budget setting of the wrong type, naming it, before anything is sent.

    ``settings`` are keywords as ``stream()`` and the clients take them (``budget``,
    ``token_budget``, ``budget_wait``, ``count_prompt``); an absent or ``None`` one is
    not checked. Unchecked, a wrong type fails only when the call is planned, deep in
    the budget arithmetic.

    Example::

        check_budget_settings({"budget": 500})  # InvalidRequestError: budget must be ...
    """
    budget = settings.get("budget")
    if budget is not None and not isinstance(budget, CallBudget):
        raise InvalidRequestError(
            f"budget must be a llmstream.CallBudget or None, got {_given(budget)}: "
            "pass e.g. budget=llmstream.CallBudget(total_tokens=2_000)."
        )
    shared = settings.get("token_budget")
    if shared is not None and not isinstance(shared, TokenBudget):
        raise InvalidRequestError(
            f"token_budget must be a llmstream.TokenBudget or None, got {_given(shared)}: "
            "pass e.g. token_budget=llmstream.TokenBudget(100_000); for one call's own "
            "limit, budget=llmstream.CallBudget(...)."
        )
    wait = settings.get("budget_wait")
    if wait is not None:
        require_flag("budget_wait", wait)
    counting = settings.get("count_prompt")
    if counting is not None and not (
        counting in _PROMPT_COUNTINGS if isinstance(counting, str) else callable(counting)
    ):
        raise InvalidRequestError(
            'count_prompt must be "estimate", "server" or a token counter (a function '
            "taking the list of messages and returning an int, e.g. "
            f"llmstream.counter_from_text_tokenizer(enc.encode)), got {_given(counting)}."
        )
