"""The distribution is installed by its own name and imported as ``llmstream``.

"llmstream" on the package index is an unrelated project: an install line that names it
installs that project, and ``llmstream.AsyncClient`` is then an ``AttributeError``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import llmstream

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "llmstream-sdk"

# A requirement naming the unrelated project: `llmstream`, `llmstream[relay]`,
# `"llmstream[relay]"`, `llmstream==0.1`, but not `llmstream-sdk` nor a path.
_WRONG_REQUIREMENT = re.compile(r"""(?<![\w./-])["']?llmstream(?![\w-])(?:\[[^\]]*\])?""")


def _install_lines() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", *sorted(ROOT.glob("src/**/*.py"))]
    for folder in ("docs", "examples", "benchmarks"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in {".md", ".py"})
    lines = []
    for path in files:
        for line in path.read_text("utf-8").splitlines():
            if "pip install" in line:
                lines.append((str(path.relative_to(ROOT)), line))
    return lines


def test_the_installed_distribution_is_named_llmstream_sdk() -> None:
    dist = importlib.metadata.distribution(DISTRIBUTION)
    assert dist.metadata["Name"] == DISTRIBUTION
    assert dist.version == llmstream.__version__


def test_the_console_script_comes_from_the_distribution() -> None:
    [script] = [
        ep
        for ep in importlib.metadata.distribution(DISTRIBUTION).entry_points
        if ep.group == "console_scripts"
    ]
    assert (script.name, script.value) == ("llmstream", "llmstream._cli:main")


def test_the_wheel_holds_the_llmstream_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert project["project"]["name"] == DISTRIBUTION
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/llmstream"]
    # The dev extra names the distribution itself, so it must use the new name too.
    assert project["project"]["optional-dependencies"]["dev"] == [f"{DISTRIBUTION}[test,docs]"]


def test_there_are_install_lines_to_check() -> None:
    assert any(DISTRIBUTION in line for _, line in _install_lines())


@pytest.mark.parametrize("where,line", _install_lines())
def test_no_install_line_names_the_unrelated_project(where: str, line: str) -> None:
    # Only the install command itself: `pip install . && llmstream chat` runs the CLI after.
    command = re.split(r"&&|;|\||#", line[line.index("pip install") :])[0]
    assert not _WRONG_REQUIREMENT.search(command), f"{where}: {line.strip()}"


def test_the_check_catches_the_wrong_name() -> None:
    wrong = ['pip install "llmstream[relay]"', "pip install llmstream", "pip install llmstream==1"]
    right = ['pip install "llmstream-sdk[relay]"', 'pip install -e ".[test]"', "pip install ./x"]
    assert all(_WRONG_REQUIREMENT.search(line) for line in wrong)
    assert not any(_WRONG_REQUIREMENT.search(line) for line in right)
