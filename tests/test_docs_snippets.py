"""Code shown in the README and the docs runs as shown, against the emulator on loopback."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from llmstream.testing import FakeVLLM

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_block(path: Path, containing: str) -> str:
    blocks = [b for b in _BLOCK.findall(path.read_text("utf-8")) if containing in b]
    assert len(blocks) == 1, f"{path.name}: {len(blocks)} python blocks contain {containing!r}"
    return str(blocks[0])


def test_readme_snippet_runs_as_a_script(tmp_path: Path) -> None:
    # Top-level `async with` is a SyntaxError in a script: the snippet must carry its own loop.
    code = _python_block(ROOT / "README.md", "llmstream.AsyncClient(")
    with FakeVLLM("PagedAttention pages the KV cache.").serve() as server:
        script = tmp_path / "readme.py"
        script.write_text(code.replace("http://localhost:8000/v1", server.base_url), "utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PagedAttention pages the KV cache.\nstop: ")
    assert re.search(r"stop: \d+ tokens in \d+\.\d\ds\n$", done.stdout), done.stdout


def _run_page_test(page: str, test_name: str) -> None:
    """Run the test function ``test_name``, defined in one python block of ``page``."""
    code = _python_block(ROOT / "docs" / page, f"def {test_name}")
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}_example"}
    exec(compile(code, f"docs/{page}", "exec"), namespace)
    test = namespace[test_name]
    assert callable(test)
    test()


def test_testing_page_disconnect_example_passes() -> None:
    _run_page_test("testing.md", "test_summary_stops_reading_after_the_first_sentence")


def test_fleet_page_testing_example_passes() -> None:
    _run_page_test("fleet.md", "test_summarise_survives_a_dead_replica")


def test_fleet_page_snippets_compile() -> None:
    # Top-level `await` is allowed: the blocks show the body of an async function.
    for block in _BLOCK.findall((ROOT / "docs" / "fleet.md").read_text("utf-8")):
        compile(block, "docs/fleet.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
