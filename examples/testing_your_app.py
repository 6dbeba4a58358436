"""Testing your own code with the emulator: a pytest module, faults included.

The code under test is ``answer()``, a tiny app function: it streams an answer, gives up
reading after ``max_chars`` characters, and returns what it has with a flag saying whether it
is whole. The tests run it against ``FakeVLLM``: a whole answer, a connection that breaks
halfway, an error event inside the stream, and an early stop that must release the server.
No model, GPU or network is needed.

Run it (the emulator only; this file has nothing to do with a real server):

    python -m pytest examples/testing_your_app.py -q
    python examples/testing_your_app.py
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import llmstream
from llmstream.testing import FakeVLLM, Fault

# --- the app ----------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    whole: bool


SYSTEM = "You are a concise assistant."


def answer(client: llmstream.Client, question: str, *, max_chars: int = 2000) -> Answer:
    """Stream the answer to ``question``; keep what arrived if the stream fails."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
    ]
    received = ""
    try:
        with client.stream(messages, max_tokens=256) as stream:
            for text in stream:
                received += text
                if len(received) >= max_chars:
                    return Answer(received, whole=False)  # leaving the block closes the stream
        return Answer(stream.result.text, whole=True)
    except llmstream.StreamInterrupted as exc:  # ServerStreamError and StreamTimeout too
        return Answer(exc.partial.text, whole=False)


# --- the tests --------------------------------------------------------------------------

ANSWER = "The Eiffel Tower is 330 metres tall, antennas included."


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM(ANSWER)


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[llmstream.Client]:
    # model= skips the GET /v1/models lookup, so fake.requests holds only chat requests.
    with llmstream.Client(
        "http://vllm.test/v1", model="llmstream/fake-model", transport=fake.transport()
    ) as client:
        yield client


def test_whole_answer_and_the_request_sent(client: llmstream.Client, fake: FakeVLLM) -> None:
    assert answer(client, "How tall is the Eiffel Tower?") == Answer(ANSWER, whole=True)
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.json is not None
    assert request.json["messages"][0] == {"role": "system", "content": SYSTEM}
    assert request.json["max_tokens"] == 256
    assert fake.disconnects == []  # read to the end: the connection went back to the pool


def test_broken_connection_keeps_the_partial_answer(
    client: llmstream.Client, fake: FakeVLLM
) -> None:
    fake.add_fault(Fault.disconnect(after_chunks=5))  # role chunk + 4 tokens, then cut
    result = answer(client, "How tall is the Eiffel Tower?")
    assert result == Answer("The Eiffel Tower is", whole=False)


def test_error_event_inside_the_stream_is_not_a_whole_answer(
    client: llmstream.Client, fake: FakeVLLM
) -> None:
    fake.add_fault(Fault.inband_error(after_chunks=3, code=503))
    result = answer(client, "How tall is the Eiffel Tower?")
    assert not result.whole
    assert ANSWER.startswith(result.text)


def test_next_request_after_a_fault_succeeds(client: llmstream.Client, fake: FakeVLLM) -> None:
    fake.add_fault(Fault.truncate(after_chunks=3))
    assert not answer(client, "Q").whole
    assert answer(client, "Q").whole  # one fault, one request


def test_stopping_early_releases_the_server() -> None:
    # A real socket: the emulator notices the disconnect the way vLLM does.
    fake = FakeVLLM(ANSWER, token_delay=0.02)
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        result = answer(client, "How tall is the Eiffel Tower?", max_chars=10)
        seen = fake.wait_for_disconnect(timeout=2)
    assert result == Answer("The Eiffel", whole=False)
    assert seen.chunks_sent < 10  # closed long before the end of the answer


if __name__ == "__main__":
    # pytest in a fresh process: this one has already imported the code under test.
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q"]))
