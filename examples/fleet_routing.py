"""Several vLLM replicas behind one client: sessions, failover, resume and admission.

``llmstream.AsyncClient(fleet=llmstream.Fleet(...))`` sends each call to the least loaded
replica (from their ``/metrics``), keeps a conversation on one replica while it is not
much busier than the others (its prefix cache is there), moves a call that fails before
its first token to another replica, continues an answer that breaks mid-stream, and
raises ``OverloadedError`` when every replica is saturated instead of queueing.

Against the built-in emulator it starts three replicas on loopback sockets
(``llmstream.testing.FakeFleet``) and breaks them one way after another. Against real
servers, list them in ``LLMSTREAM_BASE_URLS`` (comma-separated); the calls that need no
fault run there:

    python examples/fleet_routing.py
    LLMSTREAM_BASE_URLS=http://gpu1:8000/v1,http://gpu2:8000/v1 python examples/fleet_routing.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeFleet

QUESTION = "List the planets of the solar system, in order."
ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."


def make_fleet(urls: list[str], model: str) -> llmstream.Fleet:
    """The replicas, named replica-a, replica-b...; /metrics read every quarter second."""
    endpoints = [
        llmstream.Endpoint(url, name=f"replica-{chr(ord('a') + i)}") for i, url in enumerate(urls)
    ]
    return llmstream.Fleet(endpoints, model=model, scrape_interval=0.25)


def labels(fleet: llmstream.Fleet) -> dict[str, str]:
    """Endpoint names by base URL (``result.endpoint`` is the base URL that answered)."""
    return {endpoint.base_url: endpoint.label for endpoint in fleet.endpoints}


async def conversation(client: llmstream.AsyncClient, names: dict[str, str]) -> None:
    print("1. one conversation, two turns: one replica (its prefix cache is warm)")
    first = await client.complete(QUESTION, session="carol")
    turn_two: list[llmstream.Message] = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And the dwarf planets?"},
    ]
    second = await client.complete(turn_two, session="carol")
    same = first.endpoint == second.endpoint
    print(f"  turn 1 on {names[str(first.endpoint)]}; turn 2 on the same replica: {same}")


async def broken_answer(client: llmstream.AsyncClient, fleet: FakeFleet) -> None:
    print("2. a replica breaks mid-answer: the answer goes on from where it broke")
    home = await client.complete(QUESTION, session="alice")  # where alice's calls go
    replica = next(r for r in fleet if r.base_url == home.endpoint)
    replica.die_mid_stream(after_chunks=5)  # the role chunk and four tokens
    async with client.stream(QUESTION, session="alice") as stream:
        text = "".join([piece async for piece in stream])
    print(f"  every character once: {text == ANSWER}; resumes: {stream.result.resumes}")


async def replica_down(
    client: llmstream.AsyncClient, fleet: FakeFleet, names: dict[str, str]
) -> None:
    print("3. replica-b is down: calls move to another replica before their first token")
    fleet[1].down()
    results = await asyncio.gather(*(client.complete(QUESTION) for _ in range(6)))
    by = [names[str(r.endpoint)] for r in results]
    print(f"  {len(results)} of 6 answered, {by.count('replica-b')} by replica-b")
    fleet[1].up()
    for _ in range(300):  # an open circuit closes after its cool-down and a /health probe
        if all(load.state == "closed" for load in client.endpoint_loads()):
            break
        await client.complete(QUESTION)
        await asyncio.sleep(0.02)
    states = ", ".join(f"{load.name} {load.state}" for load in client.endpoint_loads())
    print(f"  back up: {states}")


async def overloaded(client: llmstream.AsyncClient, fleet: FakeFleet) -> None:
    print("4. every replica reports a full queue: OverloadedError, not a longer queue")
    for fake in fleet.fakes:
        fake.set_metrics(waiting=100)  # over Admission.queue_limit (64)
    for _ in range(200):  # calls go on until the client has read the new figures
        try:
            await client.complete(QUESTION)
        except llmstream.OverloadedError as exc:
            print(f"  OverloadedError; an endpoint may have room in {exc.retry_after:.2f} s")
            break
        await asyncio.sleep(0.02)
    for load in client.endpoint_loads():
        print(f"  {load.name}: waiting={load.waiting}, in flight={load.in_flight}")


async def main() -> None:
    listed = os.environ.get("LLMSTREAM_BASE_URLS") or os.environ.get("LLMSTREAM_BASE_URL")
    if listed:
        urls = [url.strip() for url in listed.split(",") if url.strip()]
        model = os.environ.get("LLMSTREAM_MODEL")
        if model is None:
            async with llmstream.AsyncClient(urls[0]) as probe:
                model = (await probe.models())[0]
        config = make_fleet(urls, model)
        async with llmstream.AsyncClient(fleet=config) as client:
            await conversation(client, labels(config))
            for load in client.endpoint_loads():
                print(f"  {load.name}: waiting={load.waiting}, kv_cache={load.kv_cache}")
        return
    # First tokens after 50 ms, as a real server's: a few milliseconds of noise then weigh
    # little in the replicas' first-token times, which routing compares.
    with FakeFleet(3, text=ANSWER, ttft=0.05, token_delay=0.002) as fleet:
        config = make_fleet(fleet.base_urls, "llmstream/fake-model")
        names = labels(config)
        # resume=True: an answer that breaks goes on, on a new request, instead of raising.
        retry = llmstream.RetryPolicy(resume=True)
        async with llmstream.AsyncClient(fleet=config, retry=retry) as client:
            await conversation(client, names)
            await broken_answer(client, fleet)
            await replica_down(client, fleet, names)
            await overloaded(client, fleet)


if __name__ == "__main__":
    asyncio.run(main())
