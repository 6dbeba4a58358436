"""Load-test a server with Locust: TTFT, ITL and whole streams as Locust request metrics.

Shows: ``llmstream.locust.LLMStreamUser``, a Locust user whose ``stream_chat()`` streams an
answer and reports its time to first token (type ``TTFT``), every gap between tokens
(``ITL``) and the whole stream (``STREAM``, a failure when it fails) to Locust, so its
statistics, charts, CSV files and master/worker cluster show them. Needs Locust:
``pip install "llmstream-sdk[locust]"``.

With Locust, against your server (its web UI on http://localhost:8089, or headless):

    locust -f examples/locustfile.py --host http://localhost:8000/v1
    locust -f examples/locustfile.py --host http://localhost:8000/v1 \\
        --headless -u 32 -r 8 -t 2m --csv run

On several machines, one master and any number of workers (docs/load-testing.md):

    locust -f examples/locustfile.py --master --host http://vllm:8000/v1
    locust -f examples/locustfile.py --worker --master-host MASTER_ADDRESS

Or with python: a 3-second test of 4 users against the built-in emulator, on Locust's
local runner, printing Locust's statistics:

    python examples/locustfile.py
"""

from __future__ import annotations

import time

from locust import between, task
from locust.env import Environment

from llmstream.locust import LLMStreamUser
from llmstream.testing import FakeVLLM


class ChatUser(LLMStreamUser):
    """One user of a chat application: a short question often, a longer answer sometimes."""

    wait_time = between(0.1, 0.5)  # seconds a user reads before asking again
    max_tokens = 32

    @task(3)
    def short_question(self) -> None:
        self.stream_chat("Explain PagedAttention in one sentence.", name="short")

    @task(1)
    def long_answer(self) -> None:
        self.stream_chat("Write a paragraph about KV caches.", name="long", max_tokens=64)


def main() -> None:
    # 10 ms per token after 50 ms to the first: the figures below should say about that.
    fake = FakeVLLM(tokens=[" token"] * 64, ttft=0.05, token_delay=0.01)
    with fake.serve() as server:
        env = Environment(user_classes=[ChatUser], host=server.base_url)
        runner = env.create_local_runner()
        runner.start(4, spawn_rate=4)
        time.sleep(3)  # gevent's sleep: importing locust monkey-patched it; the users run
        runner.quit()
    print(f"{'type':<8}{'name':<8}{'requests':>10}{'failures':>10}{'median ms':>11}{'p99 ms':>8}")
    for (name, kind), entry in sorted(env.stats.entries.items(), key=lambda item: item[0][::-1]):
        print(
            f"{kind:<8}{name:<8}{entry.num_requests:>10}{entry.num_failures:>10}"
            f"{entry.median_response_time:>11.0f}{entry.get_response_time_percentile(0.99):>8.0f}"
        )


if __name__ == "__main__":
    main()
