"""vLLM's checks of a chat completion request body, and the 400 each failure gets.

vLLM 0.33.0 checks a body in three steps, and the emulator follows each:

1. The ``ChatCompletionRequest`` model's "before" validators, on the raw JSON (pydantic
   runs them last-defined first). The first one that fails answers alone, as a
   ``VLLMValidationError`` (``type`` ``BadRequestError``, ``param`` the field) or as the
   ``TypeError`` of iterating a ``messages`` that is a number or null.
2. The fields, in lax pydantic mode: ``"5"`` is a valid ``max_tokens`` and ``"yes"`` a
   valid ``stream``. Every failing field is listed, in the model's field order, in one
   FastAPI validation error (``type`` ``Bad Request``, ``param`` the first ``loc``).
3. After the model and the prompt length are checked, ``SamplingParams`` (ranges of
   ``n``, ``temperature``, ``top_p``, the penalties, ``max_tokens``...), as a
   ``VLLMValidationError`` again. :func:`check_sampling` is this step.

Only the fields a client commonly sends are checked; vLLM's many other extra fields are
accepted as they come.

>>> check_request({"messages": [], "stream": "yes", "max_tokens": "5"})["stream"]
True
>>> check_request({"messages": [], "top_logprobs": 2}).message
'when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Invalid", "check_request", "check_sampling"]

JSON = dict[str, object]

# vLLM's defaults (envs.VLLM_MAX_N_SEQUENCES, envs.VLLM_MAX_STOP_STRINGS).
_MAX_N = 16384
_MAX_STOP = 4
# sampling_params._SAMPLING_EPS and _MAX_TEMP: a temperature under 1e-2 is raised to it,
# so only 0 counts as greedy.
_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2
_INT64 = 2**63
# The validation handler bounds what it echoes (validation._MAX_*).
_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200
_MAX_ERROR_CHARS = 1000

_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
# The members of vLLM's ChatCompletionMessageParam union, in its order, each with its
# required keys in its own order; openai_harmony's Message, a model, comes last.
_MESSAGE_TYPES = (
    ("ChatCompletionDeveloperMessageParam", ("content", "role")),
    ("ChatCompletionSystemMessageParam", ("content", "role")),
    ("ChatCompletionUserMessageParam", ("content", "role")),
    ("ChatCompletionAssistantMessageParam", ("role",)),
    ("ChatCompletionToolMessageParam", ("content", "role", "tool_call_id")),
    ("ChatCompletionFunctionMessageParam", ("content", "name", "role")),
    ("CustomChatCompletionMessageParam", ("role",)),
)
_NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"
_LIST = "Input should be a valid list"
_FLOAT_PARSING = "Input should be a valid number, unable to parse string as a number"
_NAMED_TOOL_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True)
class Invalid:
    """A body vLLM refuses: its ``ErrorResponse`` fields, ``code`` the HTTP status too.

    >>> Invalid("n must be at least 1, got 0.", "BadRequestError", None).param
    """

    message: str
    type: str
    param: str | None
    code: int = 400


class _Bad(Exception):
    """One pydantic error of a field value: its ``type``, ``msg`` and ``ctx``."""

    def __init__(self, type: str, msg: str, ctx: JSON | None = None) -> None:
        super().__init__(msg)
        self.type = type
        self.msg = msg
        self.ctx = ctx


def _param_error(message: str, param: str | None = None, value: object = None) -> Invalid:
    """A ``VLLMValidationError``, as ``create_error_response`` renders it."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return Invalid(_sanitize(text), "BadRequestError", param)


def _type_error(exc: TypeError) -> Invalid:
    """A ``TypeError`` out of vLLM's validators: its exception handler makes it a 400."""
    return Invalid(_sanitize(str(exc)), "BadRequestError", None)


def _sanitize(message: str) -> str:
    # vLLM's sanitize_message: no memory addresses, tracebacks or file paths in errors.
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


# --- step 1: the before validators ------------------------------------------------------


def _check_messages_iterable(data: JSON) -> Invalid | None:
    # check_system_message_content_type loops over messages (absent: []); a number or
    # null raises TypeError there, which vLLM answers as a plain 400.
    try:
        iter(data.get("messages", []))  # type: ignore[call-overload]
    except TypeError as exc:
        return _type_error(exc)
    return None


def _check_generation_prompt(data: JSON) -> Invalid | None:
    if data.get("continue_final_message") and data.get("add_generation_prompt"):
        return _param_error(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    return None


def _check_tool_usage(data: JSON) -> Invalid | None:
    if data.get("tools") == []:
        return _param_error(
            "`tools` must not be an empty array. "
            "Either provide at least one tool or omit the field entirely.",
            "tools",
        )
    choice = data.get("tool_choice", "auto" if data.get("tools") else None)
    if choice is None or choice == "none":
        return None
    if data.get("tools") is None:
        return _param_error("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if not isinstance(choice, dict):
        if choice in ("auto", "required"):
            return None
        return _param_error(
            f"Invalid value for `tool_choice`: {choice}! "
            'Only named tools, "none", "auto" or "required" are supported.',
            "tool_choice",
        )
    function = choice.get("function")
    if not isinstance(function, dict):
        return _param_error(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {_NAMED_TOOL_USAGE}",
            "tool_choice.function",
        )
    if "name" not in function:
        return _param_error(
            f"Expected field `name` in `function` in `tool_choice`! {_NAMED_TOOL_USAGE}",
            "tool_choice.function.name",
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        return _param_error(
            f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_NAMED_TOOL_USAGE}",
            "tool_choice.function.name",
        )
    try:
        tools: object = data["tools"]
        for tool in tools:  # type: ignore[attr-defined]
            if tool["function"]["name"] == name:
                return None
    except TypeError as exc:  # vLLM indexes the raw tools alike
        return _type_error(exc)
    except KeyError as exc:  # unlike a TypeError, a 500 from vLLM's catch-all handler
        return Invalid(_sanitize(str(exc)), "InternalServerError", None, 500)
    return _param_error(
        "The tool specified in `tool_choice` does not match any of the specified `tools`",
        "tool_choice",
    )


def _check_logprobs(data: JSON) -> Invalid | None:
    if data.get("logprob_token_ids") and data.get("use_beam_search"):
        return _param_error(
            "`logprob_token_ids` is not supported with beam search.", "logprob_token_ids"
        )
    if data.get("logprob_token_ids") and not data.get("logprobs"):
        return _param_error(
            "when using `logprob_token_ids`, `logprobs` must be set to true.",
            "logprob_token_ids",
        )
    for name in ("prompt_logprobs", "top_logprobs"):
        value = data.get(name)
        if value is not None and not isinstance(value, int | float):
            return _param_error(f"`{name}` must be an integer.", name, value)
    prompt_logprobs = data.get("prompt_logprobs")
    if isinstance(prompt_logprobs, int | float):
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            return _param_error(
                "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            return _param_error(
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                prompt_logprobs,
            )
    top_logprobs = data.get("top_logprobs")
    if isinstance(top_logprobs, int | float):
        if top_logprobs < 0 and top_logprobs != -1:
            return _param_error(
                "`top_logprobs` must be a positive value or -1.", "top_logprobs", top_logprobs
            )
        if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
            return _param_error(
                "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
            )
    return None


def _check_stream_options(data: JSON) -> Invalid | None:
    if data.get("stream_options") and not data.get("stream"):
        return _param_error(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    return None


def _check_response_format(data: JSON) -> Invalid | None:
    response_format = data.get("response_format")
    if (
        isinstance(response_format, dict)
        and response_format.get("type") == "json_schema"
        and response_format.get("json_schema") is None
    ):
        return _param_error(
            "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
            "response_format",
        )
    return None


def _check_tool_calls_iterable(data: JSON) -> Invalid | None:
    # _normalize_messages_before turns each message's tool_calls into a list.
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls is not None and not isinstance(calls, list):
            try:
                iter(calls)
            except TypeError as exc:
                return _type_error(exc)
    return None


# In the order pydantic runs them: the reverse of their definition in the model.
_BEFORE: tuple[Callable[[JSON], Invalid | None], ...] = (
    _check_messages_iterable,
    _check_generation_prompt,
    _check_tool_usage,
    _check_logprobs,
    _check_stream_options,
    _check_response_format,
    _check_tool_calls_iterable,
)


# --- step 2: the fields, coerced as pydantic's lax mode does ----------------------------


def _as_int(value: object) -> int:
    if isinstance(value, int):  # bool too: True is 1
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad("finite_number", "Input should be a finite number")
        if not value.is_integer():
            raise _Bad(
                "int_from_float",
                "Input should be a valid integer, got a number with a fractional part",
            )
        if not -_INT64 <= value < _INT64:
            raise _Bad(
                "int_parsing_size",
                "Unable to parse input string as an integer, exceeded maximum size",
            )
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text.split(".")[0])
        raise _Bad(
            "int_parsing", "Input should be a valid integer, unable to parse string as an integer"
        )
    raise _Bad("int_type", "Input should be a valid integer")


def _as_float(value: object) -> float:
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an int past float's range
            raise _Bad("float_parsing", _FLOAT_PARSING) from None
    if isinstance(value, str):
        try:
            if value.isascii():
                return float(value)
        except ValueError:
            pass
        raise _Bad("float_parsing", _FLOAT_PARSING)
    raise _Bad("float_type", "Input should be a valid number")


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    unsure = _Bad("bool_parsing", "Input should be a valid boolean, unable to interpret input")
    if isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise unsure
    if isinstance(value, int | float) and math.isfinite(value) and -_INT64 <= value < _INT64:
        if value in (0, 1):
            return bool(value)
        if float(value).is_integer():
            raise unsure
    raise _Bad("bool_type", "Input should be a valid boolean")


def _as_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Bad("string_type", "Input should be a valid string")


_KINDS: dict[str, Callable[[object], object]] = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
}

# (field, kind, nullable), in ChatCompletionRequest's field order; "messages", "stop"
# and "stream_options" have checks of their own.
_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("messages", "messages", False),
    ("model", "str", True),
    ("frequency_penalty", "float", True),
    ("logprobs", "bool", True),
    ("top_logprobs", "int", True),
    ("max_tokens", "int", True),
    ("max_completion_tokens", "int", True),
    ("n", "int", True),
    ("presence_penalty", "float", True),
    ("seed", "int", True),
    ("stop", "stop", True),
    ("stream", "bool", True),
    ("stream_options", "stream_options", True),
    ("temperature", "float", True),
    ("top_p", "float", True),
    ("user", "str", True),
    ("top_k", "int", True),
    ("min_p", "float", True),
    ("repetition_penalty", "float", True),
    ("ignore_eos", "bool", False),
    ("min_tokens", "int", False),
    ("echo", "bool", False),
    ("add_generation_prompt", "bool", False),
    ("continue_final_message", "bool", False),
    ("priority", "int", False),
    ("request_id", "str", False),
)


def _summarize(value: object) -> object:
    """The ``input`` vLLM echoes in a validation error (validation._summarize_error_input)."""
    if isinstance(value, str):
        if len(value) > _MAX_ERROR_INPUT_CHARS:
            return value[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
        return value
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = str(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
    if len(text) > _MAX_ERROR_INPUT_CHARS:
        return text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
    return text


def _error(loc: str, bad: _Bad, value: object) -> JSON:
    error: JSON = {"type": bad.type, "loc": loc, "msg": bad.msg, "input": _summarize(value)}
    if bad.ctx is not None:
        error["ctx"] = bad.ctx
    return error


def _missing(loc: str, value: object) -> JSON:
    return _error(loc, _Bad("missing", "Field required"), value)


def _message_errors(index: int, message: object) -> list[JSON]:
    """The union's errors for a message that is not an object, or has no ``role``.

    Only messages of string ``content``, ``name`` and ``tool_call_id`` get the second
    kind; other malformed messages (a wrong ``content`` type, say) are let through, as
    their errors depend on every member of the union.
    """
    loc = f"body.messages.{index}"
    if not isinstance(message, dict):
        bad = _Bad("dict_type", "Input should be a valid dictionary")
        errors = [_error(f"{loc}.{name}", bad, message) for name, _ in _MESSAGE_TYPES]
        harmony = _Bad("model_attributes_type", _NOT_AN_OBJECT)
        return [*errors, _error(f"{loc}.Message", harmony, message)]
    plain = all(isinstance(message[key], str) for key in message)
    if "role" in message or not plain or not {"content", "name", "tool_call_id"} >= set(message):
        return []
    errors = [
        _missing(f"{loc}.{name}.{key}", message)
        for name, required in _MESSAGE_TYPES
        for key in required
        if key not in message
    ]
    errors.append(_missing(f"{loc}.Message.author", message))
    if "content" in message:
        bad = _Bad("list_type", _LIST)
        errors.append(_error(f"{loc}.Message.content", bad, message["content"]))
    return errors


def _field_errors(field: str, kind: str, value: object, out: JSON) -> list[JSON]:
    """The errors of one field; its coerced value goes into ``out``."""
    loc = f"body.{field}"
    if kind == "messages":
        if not isinstance(value, list):
            return [_error(loc, _Bad("list_type", _LIST), value)]
        return [e for i, m in enumerate(value) for e in _message_errors(i, m)]
    if kind == "stop":
        if isinstance(value, str):
            return []
        not_str = _Bad("string_type", "Input should be a valid string")
        if not isinstance(value, list):
            return [_error(loc, not_str, value), _error(loc, _Bad("list_type", _LIST), value)]
        if len(value) > _MAX_STOP:
            # pydantic gives up on the list as soon as it is too long.
            ctx: JSON = {"field_type": "List", "max_length": _MAX_STOP, "actual_length": len(value)}
            too_long = _Bad(
                "too_long",
                f"List should have at most {_MAX_STOP} items after validation, not {len(value)}",
                ctx,
            )
            return [_error(loc, not_str, value), _error(loc, too_long, value)]
        items = [
            _error(f"{loc}.{i}", not_str, s) for i, s in enumerate(value) if not isinstance(s, str)
        ]
        return [_error(loc, not_str, value), *items] if items else []
    if kind == "stream_options":
        if not isinstance(value, dict):
            # FastAPI validates with from_attributes=True, hence not "model_type".
            return [_error(loc, _Bad("model_attributes_type", _NOT_AN_OBJECT), value)]
        options = dict(value)
        errors = []
        for key in ("include_usage", "continuous_usage_stats"):
            if options.get(key) is not None:
                try:
                    options[key] = _as_bool(options[key])
                except _Bad as bad:
                    errors.append(_error(f"{loc}.{key}", bad, options[key]))
        out[field] = options
        return errors
    try:
        out[field] = _KINDS[kind](value)
    except _Bad as bad:
        return [_error(loc, bad, value)]
    return []


def _validation_error(errors: list[JSON]) -> Invalid:
    """FastAPI's ``RequestValidationError`` as vLLM's handler words it."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    message = f"{count} validation {label}:\n"
    for error in errors[:_MAX_REPORTED_ERRORS]:
        text = str(error)
        if len(text) > _MAX_ERROR_CHARS:
            text = text[:_MAX_ERROR_CHARS] + "...[truncated]"
        message += f"  {text}\n"
    if count > _MAX_REPORTED_ERRORS:
        message += f"  ...and {count - _MAX_REPORTED_ERRORS} more {label}\n"
    return Invalid(_sanitize(message.rstrip()), "Bad Request", str(errors[0]["loc"]))


def check_request(body: object) -> JSON | Invalid:
    """Validate a parsed chat completion body as vLLM's request model does.

    Returns the body with the checked fields coerced as vLLM reads them (``"5"`` is 5,
    ``"yes"`` True, ``top_logprobs`` null is 0), or the :class:`Invalid` vLLM answers.

    >>> check_request({"messages": [], "n": 0})["n"]
    0
    >>> check_request({"messages": ["hi"]}).param
    'body.messages.0.ChatCompletionDeveloperMessageParam'
    >>> check_request([]).message.splitlines()[1]
    "  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid \
dictionary or object to extract fields from', 'input': '<list of 0 items>'}"
    """
    if body is None:  # no body, or "null"
        return _validation_error([_missing("body", body)])
    if not isinstance(body, dict):
        bad = _Bad("model_attributes_type", _NOT_AN_OBJECT)
        return _validation_error([_error("body", bad, body)])
    data = dict(body)
    for check in _BEFORE:
        invalid = check(data)
        if invalid is not None:
            return invalid
    if data.get("top_logprobs") is None and "top_logprobs" in data:
        data["top_logprobs"] = 0  # TopLogprobsParam: null means omitted
    errors: list[JSON] = []
    for field, kind, nullable in _FIELDS:
        if field not in data:
            if field == "messages":
                errors.append(_missing("body.messages", data))
            continue
        value = data[field]
        if value is None and nullable:
            continue
        errors += _field_errors(field, kind, value, data)
    if errors:
        return _validation_error(errors)
    return data


# --- step 3: SamplingParams -------------------------------------------------------------


def _number(data: Mapping[str, object], name: str, default: float) -> float:
    value = data.get(name)
    return default if value is None else float(value)  # type: ignore[arg-type]


def check_sampling(data: Mapping[str, object], max_tokens: int) -> Invalid | None:
    """``SamplingParams``' checks of a body :func:`check_request` passed.

    ``max_tokens`` is the cap vLLM computed: the request's, or the room left in the
    context, whichever is smaller (so 0 when the prompt fills the context).

    >>> check_sampling({"temperature": 3.0}, 16).message
    'temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)'
    >>> check_sampling({"n": 2, "temperature": 0.0}, 16).message
    'n must be 1 when using greedy sampling, got 2.'
    """
    raw_n = data.get("n")
    n = 1 if raw_n is None else int(raw_n)  # type: ignore[call-overload]
    if n < 1:
        return _param_error(f"n must be at least 1, got {n}.")
    if n > _MAX_N:
        return _param_error(
            f"n must be at most {_MAX_N}, got {n}. "
            "To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."
        )
    for name in ("presence_penalty", "frequency_penalty"):
        penalty = _number(data, name, 0.0)
        if not -2.0 <= penalty <= 2.0:
            return _param_error(f"{name} must be in [-2, 2], got {penalty}.")
    repetition = _number(data, "repetition_penalty", 1.0)
    if not math.isfinite(repetition):
        return _param_error(f"repetition_penalty must be a finite number, got {repetition}.")
    if repetition <= 0.0:
        return _param_error(f"repetition_penalty must be greater than zero, got {repetition}.")
    temperature = _number(data, "temperature", 1.0)
    if 0 < temperature < _MAX_TEMP:
        temperature = _MAX_TEMP
    if not math.isfinite(temperature):
        message = f"temperature must be a finite number, got {temperature}."
        return _param_error(message, "temperature", temperature)
    if temperature < 0.0:
        message = f"temperature must be non-negative, got {temperature}."
        return _param_error(message, "temperature", temperature)
    if temperature > 2.0:
        return _param_error(
            f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature
        )
    top_p = _number(data, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        return _param_error(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    top_k = data.get("top_k")
    if isinstance(top_k, int) and top_k < -1:
        return _param_error(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
    min_p = _number(data, "min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        return _param_error(f"min_p must be in [0, 1], got {min_p}.")
    if max_tokens < 1:
        message = f"max_tokens must be at least 1, got {max_tokens}."
        return _param_error(message, "max_tokens", max_tokens)
    min_tokens = data.get("min_tokens", 0)
    if isinstance(min_tokens, int) and min_tokens < 0:
        return _param_error(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if isinstance(min_tokens, int) and min_tokens > max_tokens:
        return _param_error(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        )
    stop = data.get("stop")
    if stop == "" or (isinstance(stop, list) and not all(stop)):
        return _param_error("stop cannot contain an empty string.")
    if temperature < _SAMPLING_EPS and n > 1:
        return _param_error(f"n must be 1 when using greedy sampling, got {n}.")
    return None
