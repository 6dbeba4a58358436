"""llmstream: typed streaming chat completions from vLLM and OpenAI-compatible servers.

Example::

    import llmstream

    async with llmstream.AsyncClient("http://localhost:8000/v1") as client:
        async with client.stream("Explain PagedAttention in one sentence.") as stream:
            async for text in stream:
                print(text, end="", flush=True)
    print(stream.result.metrics)
"""

from ._accounting import PromptCounting
from ._aiohttp_transport import AiohttpTransport
from ._async_stream import AsyncChatStream
from ._asyncio_transport import AsyncioTransport
from ._budget import CallBudget
from ._call_info import CallInfo
from ._chunks import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    CompletionTokensDetails,
    FunctionCallDelta,
    PromptTokensDetails,
    ToolCallDelta,
    Usage,
)
from ._client import AsyncClient, Client
from ._deadlines import Timeouts
from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BudgetExceeded,
    BufferOverflow,
    ClientClosed,
    ConnectTimeout,
    FirstTokenTimeout,
    IdleTimeout,
    InternalServerError,
    InvalidRequestError,
    LLMStreamError,
    NotFoundError,
    OutputParseError,
    OverloadedError,
    PauseTimeout,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    ServerStreamError,
    StreamAborted,
    StreamInterrupted,
    StreamLimitExceeded,
    StreamTimeout,
    ToolArgumentsError,
    TotalTimeout,
    UnprocessableEntityError,
)
from ._events import (
    CallEvent,
    CallFailed,
    CallFinished,
    FirstToken,
    RequestSent,
    ResponseHeaders,
)
from ._fleet_config import (
    Admission,
    CircuitBreaker,
    DNSDiscovery,
    Endpoint,
    Fleet,
    Hedging,
    Routing,
)
from ._fleet_state import EndpointLoad
from ._flow import OnFull, StreamOptions
from ._hooks import Hook
from ._oneshot import stream_llm_request, stream_llm_request_sync
from ._params import SamplingParams, StreamParams
from ._prompt_count import TokenCounter, counter_from_text_tokenizer, estimate_prompt_tokens
from ._request import (
    AssistantMessage,
    Message,
    PromptOrMessages,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from ._result import (
    ChoiceResult,
    FunctionCall,
    LatencySummary,
    StreamMetrics,
    StreamResult,
    StreamStatus,
    TokenLogprob,
    TokenReport,
    ToolCall,
    TopLogprob,
)
from ._retry import CallRetries, RetryEvent, RetryPolicy
from ._sse import ServerSentEvent, SSEDecoder
from ._stream_events import FinishEvent, ReasoningEvent, StreamEvent, TextEvent, ToolCallEvent
from ._structured import response_format_for
from ._sync_stream import ChatStream
from ._token_budget import Reservation, TokenBudget
from ._version import __version__

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AiohttpTransport",
    "AsyncioTransport",
    "AssistantMessage",
    "AsyncChatStream",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceeded",
    "BufferOverflow",
    "CallBudget",
    "CallEvent",
    "CallFailed",
    "CallFinished",
    "CallInfo",
    "CallRetries",
    "ChatCompletionChunk",
    "ChatStream",
    "ChoiceResult",
    "ChunkChoice",
    "ChunkDelta",
    "Client",
    "CompletionTokensDetails",
    "ClientClosed",
    "ConnectTimeout",
    "FinishEvent",
    "FirstToken",
    "FirstTokenTimeout",
    "FunctionCall",
    "FunctionCallDelta",
    "Hook",
    "IdleTimeout",
    "InternalServerError",
    "InvalidRequestError",
    "LLMStreamError",
    "LatencySummary",
    "Message",
    "NotFoundError",
    "OnFull",
    "OutputParseError",
    "OverloadedError",
    "PauseTimeout",
    "PermissionDeniedError",
    "PromptCounting",
    "PromptOrMessages",
    "PromptTokensDetails",
    "ProtocolError",
    "RateLimitError",
    "ReasoningEvent",
    "RequestSent",
    "Reservation",
    "ResponseHeaders",
    "RetryEvent",
    "RetryPolicy",
    "SamplingParams",
    "SSEDecoder",
    "ServerSentEvent",
    "ServerStreamError",
    "StreamAborted",
    "StreamEvent",
    "StreamInterrupted",
    "StreamLimitExceeded",
    "StreamMetrics",
    "StreamOptions",
    "StreamParams",
    "StreamResult",
    "StreamStatus",
    "StreamTimeout",
    "SystemMessage",
    "Timeouts",
    "TokenBudget",
    "TokenCounter",
    "TextEvent",
    "TokenLogprob",
    "TokenReport",
    "ToolCall",
    "ToolCallEvent",
    "ToolArgumentsError",
    "ToolCallDelta",
    "ToolMessage",
    "TopLogprob",
    "TotalTimeout",
    "UnprocessableEntityError",
    "Usage",
    "UserMessage",
    "Fleet",
    "Endpoint",
    "DNSDiscovery",
    "Routing",
    "CircuitBreaker",
    "Admission",
    "Hedging",
    "EndpointLoad",
    "counter_from_text_tokenizer",
    "estimate_prompt_tokens",
    "response_format_for",
    "stream_llm_request",
    "stream_llm_request_sync",
    "__version__",
]
