"""Which call an event is about (:class:`CallInfo`), shared by every event of one call."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CallInfo"]


@dataclass(frozen=True, slots=True)
class CallInfo:
    """The call an event is about: the same object on every event of one call.

    ``call_id`` is unique (a random hex string), so one hook can follow many calls at
    once. ``request_model`` is the model asked for (None when the call failed before
    it was known); ``url``, ``server_address`` and ``server_port`` name the endpoint
    (the client's base URL, without its query string; never a credential).

    Example::

        def hook(event: llmstream.CallEvent) -> None:
            call = event.call
            print(call.call_id, call.request_model, call.server_address, call.server_port)
    """

    call_id: str
    request_model: str | None
    url: str
    server_address: str
    server_port: int
