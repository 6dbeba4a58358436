"""``FakeFleet``: several emulated vLLM replicas on loopback, to test code that spreads load.

Each replica is a :class:`~llmstream.testing.FakeVLLM` behind its own
:class:`~llmstream.testing.FakeServer` on ``127.0.0.1`` (or, with ``shared_port=True``, each
on its own loopback address and one port, as the pods of a Kubernetes Service). A test
takes replicas down and up again (same address and port), breaks their streams, slows
them, fails their health checks and sets what their ``/metrics`` report, while the code
under test talks to them over real sockets.

>>> with FakeFleet(2, text="Hi") as fleet:
...     len(fleet.base_urls), fleet[0].port != fleet[1].port
(2, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

from ._config import Disconnect, Fault, RecordedRequest
from ._fake import FakeVLLM
from ._script import CHAT_PATH
from ._server import FakeServer

__all__ = ["FakeFleet", "FakeReplica"]


class FakeReplica:
    """One replica of a :class:`FakeFleet`: an emulator and the server that serves it.

    Its port is fixed at the fleet's start and kept across :meth:`down` and :meth:`up`,
    so a client configured with :attr:`base_url` finds the replica again.

    >>> with FakeFleet(1) as fleet:
    ...     replica = fleet[0]
    ...     replica.down()
    ...     replica.is_up
    False
    """

    def __init__(self, fake: FakeVLLM, index: int, *, host: str = "127.0.0.1") -> None:
        self.fake = fake
        self.index = index
        self.server: FakeServer = fake.serve(host=host)

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        return f"<FakeReplica {self.index} {self.root_url} {state}>"

    @property
    def host(self) -> str:
        """The loopback address it listens on: ``127.0.0.1``, or ``127.0.0.N`` in a
        fleet with ``shared_port=True``.

        >>> FakeReplica(FakeVLLM(), 0).host
        '127.0.0.1'
        """
        return self.server.host

    @property
    def port(self) -> int:
        """The TCP port on :attr:`host` (0 before the fleet starts).

        >>> FakeReplica(FakeVLLM(), 0).port
        0
        """
        return self.server.port

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://127.0.0.1:PORT/v1``.

        >>> FakeReplica(FakeVLLM(), 0).base_url
        'http://127.0.0.1:0/v1'
        """
        return self.server.base_url

    @property
    def root_url(self) -> str:
        """The server's root, where ``/health`` and ``/metrics`` are: ``http://127.0.0.1:PORT``.

        >>> FakeReplica(FakeVLLM(), 0).root_url
        'http://127.0.0.1:0'
        """
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        """Whether the replica accepts connections.

        >>> FakeReplica(FakeVLLM(), 0).is_up
        False
        """
        return self.server.serving

    def down(self) -> None:
        """Die: stop listening (connections are refused) and cut the streams under way.

        Clients in the middle of an answer see the connection close mid-body, as when a
        vLLM process is killed. Does nothing when the replica is already down.

        Example::

            fleet[1].down()
        """
        self.server.stop()

    def up(self) -> None:
        """Serve again, on the same port. Does nothing when the replica is up.

        Example::

            fleet[1].up()
        """
        if not self.server.serving:
            self.server.start()

    def die_mid_stream(self, after_chunks: int = 2, *, streams: int = 1) -> None:
        """Cut the next ``streams`` chat answers abruptly after ``after_chunks`` events.

        The replica itself stays up; this is :meth:`FakeVLLM.add_fault` with
        :meth:`Fault.disconnect`. Events count the role chunk as 1, the first token as 2.

        Example::

            fleet[0].die_mid_stream(after_chunks=3)  # the role chunk and two tokens
        """
        for _ in range(streams):
            self.fake.add_fault(Fault.disconnect(after_chunks))

    def slow(self, ttft: float) -> None:
        """Wait ``ttft`` seconds before the first token of each answer from now on (0: fast).

        Example::

            fleet[2].slow(0.5)
        """
        self.fake.set_ttft(ttft)

    def unhealthy(self) -> None:
        """Answer ``GET /health`` with 503 from now on (chat requests are still answered).

        Example::

            fleet[0].unhealthy()
        """
        self.fake.set_health(False)

    def healthy(self) -> None:
        """Answer ``GET /health`` with 200 again.

        Example::

            fleet[0].healthy()
        """
        self.fake.set_health(True)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request this replica received, oldest first (scrapes and probes included).

        >>> FakeReplica(FakeVLLM(), 0).requests
        []
        """
        return self.fake.requests

    @property
    def chat_requests(self) -> int:
        """How many chat completions this replica received.

        >>> FakeReplica(FakeVLLM(), 0).chat_requests
        0
        """
        return sum(1 for r in self.fake.requests if r.method == "POST" and r.path == CHAT_PATH)

    @property
    def disconnects(self) -> list[Disconnect]:
        """Clients that left before their answer ended, oldest first.

        >>> FakeReplica(FakeVLLM(), 0).disconnects
        []
        """
        return self.fake.disconnects


class FakeFleet:
    """N emulated vLLM replicas on ``127.0.0.1``, started and stopped together.

    ``replicas`` is a count (each replica a ``FakeVLLM`` built from the other arguments)
    or a list of your own ``FakeVLLM`` objects, for replicas that differ. As a context
    manager it starts every server and stops them all at the end.

    ``shared_port=True`` puts replica N on ``127.0.0.{N+1}``, all on one port, as the
    pods behind a Kubernetes headless Service: a DNS name whose records are
    :attr:`hosts` (patch ``socket.getaddrinfo`` in a test) with
    ``DNSDiscovery(name, port=fleet.port)`` finds them. Linux routes all of
    127.0.0.0/8 to loopback; other systems may need the addresses added first.

    Example::

        with FakeFleet(3, text="Hello!", token_delay=0.01) as fleet:
            urls = fleet.base_urls          # one http://127.0.0.1:PORT/v1 each
            fleet[1].down()                 # connections refused from now on
            fleet[2].fake.set_metrics(waiting=80)  # looks saturated
            ...
            fleet[1].up()                   # back, on the same port
        assert sum(fleet.chat_requests) == 10
    """

    def __init__(
        self,
        replicas: int | Sequence[FakeVLLM] = 2,
        *,
        text: str | None = None,
        tokens: Sequence[str] | None = None,
        model: str = "llmstream/fake-model",
        ttft: float = 0.0,
        token_delay: float = 0.0,
        max_num_seqs: int | None = None,
        kv_cache_tokens: int = 131_072,
        shared_port: bool = False,
    ) -> None:
        if isinstance(replicas, int):
            if replicas < 1:
                raise ValueError(f"a fleet needs at least 1 replica, not {replicas}")
            fakes = [
                FakeVLLM(
                    text,
                    tokens=tokens,
                    model=model,
                    ttft=ttft,
                    token_delay=token_delay,
                    max_num_seqs=max_num_seqs,
                    kv_cache_tokens=kv_cache_tokens,
                )
                for _ in range(replicas)
            ]
        else:
            fakes = list(replicas)
            if not fakes:
                raise ValueError("a fleet needs at least 1 replica, not an empty list")
        if shared_port and len(fakes) > 254:
            raise ValueError("shared_port gives each replica a 127.0.0.N address: 254 at most")
        self.shared_port = shared_port
        self.replicas = [
            FakeReplica(fake, index, host=f"127.0.0.{index + 1}" if shared_port else "127.0.0.1")
            for index, fake in enumerate(fakes)
        ]

    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self) -> Iterator[FakeReplica]:
        return iter(self.replicas)

    def __getitem__(self, index: int) -> FakeReplica:
        return self.replicas[index]

    @property
    def base_urls(self) -> list[str]:
        """Every replica's base URL, ``http://127.0.0.1:PORT/v1``, in order.

        >>> with FakeFleet(2) as fleet:
        ...     all(url.endswith("/v1") for url in fleet.base_urls)
        True
        """
        return [replica.base_url for replica in self.replicas]

    @property
    def hosts(self) -> list[str]:
        """Every replica's loopback address, in order (all ``127.0.0.1`` unless
        ``shared_port=True``).

        >>> FakeFleet(2, shared_port=True).hosts
        ['127.0.0.1', '127.0.0.2']
        """
        return [replica.host for replica in self.replicas]

    @property
    def port(self) -> int:
        """The one port of a ``shared_port=True`` fleet (0 before it starts).

        >>> with FakeFleet(2, shared_port=True) as fleet:
        ...     fleet.port == fleet[1].port != 0
        True
        """
        if not self.shared_port:
            raise ValueError("the replicas have a port each: FakeFleet(..., shared_port=True)")
        return self.replicas[0].port

    @property
    def fakes(self) -> list[FakeVLLM]:
        """Every replica's emulator, in order.

        >>> len(FakeFleet(3).fakes)
        3
        """
        return [replica.fake for replica in self.replicas]

    @property
    def chat_requests(self) -> list[int]:
        """How many chat completions each replica received, in order.

        >>> FakeFleet(2).chat_requests
        [0, 0]
        """
        return [replica.chat_requests for replica in self.replicas]

    def start(self) -> FakeFleet:
        """Start every replica that is not serving; returns the fleet.

        >>> fleet = FakeFleet(2).start(); fleet.stop()
        """
        try:
            for replica in self.replicas:
                if self.shared_port and replica.port == 0:
                    # The first picks a free port; the others take it on their own address.
                    replica.server.port = self.replicas[0].port
                replica.up()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every replica (their open streams are cut).

        >>> FakeFleet(2).stop()
        """
        for replica in self.replicas:
            replica.down()

    def __enter__(self) -> FakeFleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
