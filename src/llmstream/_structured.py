"""Structured output: a pydantic model as ``response_format``, and the answer parsed back."""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ._errors import InvalidRequestError, OutputParseError

__all__ = ["ModelT", "parse_output", "response_format_for"]

ModelT = TypeVar("ModelT", bound=BaseModel)

# OpenAI's rule for json_schema.name; vLLM takes any string, so the stricter one is used.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def response_format_for(
    model: type[BaseModel], *, name: str | None = None, strict: bool = True
) -> dict[str, object]:
    """The ``response_format`` that makes the server answer with JSON for ``model``.

    The OpenAI shape vLLM accepts: ``{"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}``, with the schema pydantic generates for
    ``model``. vLLM then constrains decoding to the schema (structured outputs),
    so the answer parses with :meth:`~llmstream.StreamResult.parse`. ``name``
    defaults to the class name, made safe for OpenAI's name rule
    (letters, digits, ``_`` and ``-``, 64 at most).

    Example::

        class Weather(pydantic.BaseModel):
            city: str
            celsius: float

        async with client.stream("Weather in Paris?",
                                 response_format=llmstream.response_format_for(Weather)) as s:
            weather = (await s.final_result()).parse(Weather)
    """
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise InvalidRequestError(
            f"response_format_for() takes a pydantic model class, not {model!r}; "
            "for a hand-written JSON schema pass response_format={'type': 'json_schema', ...}."
        )
    if name is None:
        name = _NAME_UNSAFE.sub("_", model.__name__)[:64]
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": model.model_json_schema(), "strict": strict},
    }


def parse_output(
    text: str, model: type[ModelT], *, finish_reason: str | None, status: str | None
) -> ModelT:
    """Validate ``text`` (an answer) as ``model``, or raise :class:`~llmstream.OutputParseError`.

    ``finish_reason`` and ``status`` are the answer's, for a message that says
    why it may not parse (cut by ``max_tokens``, a stream that did not finish);
    ``status`` is None for one choice of a result, which has no status of its own.

    Example::

        parse_output('{"city": "Paris", "celsius": 18}', Weather,
                     finish_reason="stop", status="complete")
    """
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise OutputParseError(
            f"The answer is not a valid {model.__name__} ({_describe(exc)}): "
            f"{_excerpt(text)}. {_advice(model, finish_reason, status)}",
            text=text,
            model_name=model.__name__,
        ) from exc


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return f"not valid JSON: {first['msg']}"
    where = ".".join(str(p) for p in first["loc"]) or "the value"
    more = exc.error_count() - 1
    return f"{where}: {first['msg']}" + (f", and {more} more error(s)" if more else "")


def _advice(model: type[BaseModel], finish_reason: str | None, status: str | None) -> str:
    if status is None and finish_reason is None:
        return "This choice has not finished (no finish_reason), so the answer is partial."
    if status == "streaming":
        return "The stream has not ended yet: parse stream.result once it has."
    if status not in (None, "complete"):
        return f"The stream did not complete (status {status!r}), so the answer is partial."
    if finish_reason == "length":
        return "The answer was cut at max_tokens (finish_reason 'length'): raise max_tokens."
    return (
        "Ask the server for this schema with "
        f"response_format={model.__name__}, "
        "or read result.text yourself."
    )


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
