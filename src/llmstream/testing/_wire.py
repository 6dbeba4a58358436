"""vLLM's JSON shapes, key for key and null for null.

vLLM serializes stream chunks with ``model_dump_json(exclude_unset=True)``: a field is on
the wire exactly when its code set it, in the pydantic model's field order, so the shapes
below are literal dicts built in that order rather than models. Values match vLLM 0.33.0
(see the captures under ``vectors/vllm/v0.33.0``).

>>> ids = ChunkIds("chatcmpl-1", 1700000000, "m", "vllm-0.33.0-00000000")
>>> encode_event(content_chunk(ids, 0, {"content": "Hi"}))[:30]
b'data: {"id":"chatcmpl-1","obje'
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "DONE_EVENT",
    "KEEP_ALIVE",
    "ChunkIds",
    "completion_body",
    "content_chunk",
    "dumps",
    "encode_event",
    "error_body",
    "error_event",
    "finish_chunk",
    "model_list",
    "role_chunk",
    "usage_chunk",
    "usage_info",
]

JSON = dict[str, object]

DONE_EVENT = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class ChunkIds:
    """The values every chunk of one response repeats.

    >>> ChunkIds("chatcmpl-abc", 1700000000, "my-model", "vllm-0.33.0-1a2b3c4d").id
    'chatcmpl-abc'
    """

    id: str
    created: int
    model: str
    system_fingerprint: str


def dumps(obj: object) -> bytes:
    """Compact JSON with raw UTF-8, as pydantic and Starlette write it.

    >>> dumps({"a": "é", "b": None})
    b'{"a":"\\xc3\\xa9","b":null}'
    """
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def encode_event(obj: object) -> bytes:
    """One SSE event, ``data: <json>`` and a blank line.

    >>> encode_event({"x": 1})
    b'data: {"x":1}\\n\\n'
    """
    return b"data: " + dumps(obj) + b"\n\n"


def _head(ids: ChunkIds) -> JSON:
    return {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
    }


def usage_info(prompt: int, completion: int, *, reasoning: int | None, per_chunk: bool) -> JSON:
    """``UsageInfo`` as vLLM writes it (``total_tokens`` before ``completion_tokens``).

    ``reasoning`` is None when the server has no reasoning parser. Per-chunk usage carries
    ``completion_tokens_details`` even when null; the final usage chunk drops nulls.

    >>> usage_info(3, 2, reasoning=1, per_chunk=False)["completion_tokens_details"]
    {'reasoning_tokens': 1}
    """
    usage: JSON = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    details = None if reasoning is None else {"reasoning_tokens": reasoning}
    if per_chunk or details is not None:
        usage["completion_tokens_details"] = details
    return usage


def role_chunk(ids: ChunkIds, index: int, role: str, usage: JSON | None = None) -> JSON:
    """The first chunk of a choice: ``delta: {"role": ..., "content": ""}``.

    >>> list(role_chunk(ChunkIds("c", 0, "m", "f"), 0, "assistant"))[-2:]
    ['prompt_token_ids', 'prompt_text']
    """
    chunk = _head(ids)
    chunk["choices"] = [
        {
            "index": index,
            "delta": {"role": role, "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    if usage is not None:
        chunk["usage"] = usage
    chunk["prompt_token_ids"] = None
    chunk["prompt_text"] = None
    return chunk


def content_chunk(ids: ChunkIds, index: int, delta: JSON, usage: JSON | None = None) -> JSON:
    """A delta chunk (content, reasoning or tool-call fragment) before the finish.

    >>> content_chunk(ChunkIds("c", 0, "m", "f"), 0, {"content": "Hi"})["kv_transfer_params"]
    """
    chunk = _head(ids)
    chunk["choices"] = [
        {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
    ]
    if usage is not None:
        chunk["usage"] = usage
    chunk["kv_transfer_params"] = None
    return chunk


def finish_chunk(
    ids: ChunkIds,
    index: int,
    delta: JSON,
    finish_reason: str,
    *,
    usage: JSON | None = None,
    with_fingerprint: bool = False,
) -> JSON:
    """The chunk carrying a choice's ``finish_reason``.

    ``system_fingerprint`` rides here only when no usage chunk follows.

    >>> c = finish_chunk(ChunkIds("c", 0, "m", "f"), 0, {"content": ""}, "stop")
    >>> c["choices"][0]["stop_reason"], c["choices"][0]["weight_versions"]
    (None, None)
    """
    chunk = _head(ids)
    chunk["choices"] = [
        {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "weight_versions": None,
        }
    ]
    if usage is not None:
        chunk["usage"] = usage
    if with_fingerprint:
        chunk["system_fingerprint"] = ids.system_fingerprint
    chunk["kv_transfer_params"] = None
    return chunk


def usage_chunk(ids: ChunkIds, usage: JSON) -> JSON:
    """The ``include_usage`` chunk: ``choices: []``, totals, fingerprint.

    >>> usage_chunk(ChunkIds("c", 0, "m", "f"), {"prompt_tokens": 1})["choices"]
    []
    """
    chunk = _head(ids)
    chunk["choices"] = []
    chunk["usage"] = usage
    chunk["system_fingerprint"] = ids.system_fingerprint
    return chunk


def error_body(message: str, type: str, code: int, param: str | None = None) -> JSON:
    """vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``.

    >>> error_body("boom", "InternalServerError", 500)["error"]["param"]
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_event(message: str, type: str, code: int) -> bytes:
    """The in-band error event vLLM sends after the 200.

    >>> error_event("x", "InternalServerError", 500)
    b'data: {"error":{"message":"x","type":"InternalServerError","param":null,"code":500}}\\n\\n'
    """
    return encode_event(error_body(message, type, code))


def completion_body(
    ids: ChunkIds,
    choices: list[JSON],
    usage: JSON,
) -> JSON:
    """The non-streaming ``chat.completion`` object (full dump, every field present).

    >>> completion_body(ChunkIds("c", 0, "m", "f"), [], {})["object"]
    'chat.completion'
    """
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": ids.system_fingerprint,
        "usage": usage,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def model_list(model: str, max_model_len: int, created: int, perm_id: str) -> JSON:
    """``GET /v1/models`` as vLLM answers it.

    >>> model_list("m", 8192, 0, "modelperm-0")["data"][0]["owned_by"]
    'vllm'
    """
    permission: JSON = {
        "id": perm_id,
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card: JSON = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}
