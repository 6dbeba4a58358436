"""Test helpers: an emulator of vLLM's OpenAI-compatible server.

:class:`FakeVLLM` answers like vLLM 0.33.0, byte for byte, in process (an httpx
transport) or over a real loopback socket, and can misbehave on demand (:class:`Fault`)::

    from llmstream.testing import FakeVLLM, Fault

    fake = FakeVLLM("Hello! How can I help?", token_delay=0.01)
    fake.add_fault(Fault.disconnect(after_chunks=3))
    with fake.serve() as server:
        ...  # point a client at server.base_url
    assert fake.requests[0].json["stream"] is True

:class:`FakeFleet` serves several replicas on loopback, to test code that spreads calls
over them; each replica can die, come back on its port, slow down, fail its health
check, and report any load on ``GET /metrics``::

    from llmstream.testing import FakeFleet

    with FakeFleet(3, text="Hi!") as fleet:
        fleet[0].down()
        ...  # point the code under test at fleet.base_urls
"""

from ._config import Disconnect, Fault, RecordedRequest
from ._fake import FakeVLLM
from ._fleet import FakeFleet, FakeReplica
from ._server import FakeServer
from ._transport import FakeTransport

__all__ = [
    "Disconnect",
    "FakeFleet",
    "FakeReplica",
    "FakeServer",
    "FakeTransport",
    "FakeVLLM",
    "Fault",
    "RecordedRequest",
]
