"""Every destination example in the README is a config trackpipe accepts.

Each ```toml block of README's "Destinations" section is loaded as a config
file and put through the same validation `trackpipe serve` and `trackpipe
check` run (settings of the type, routing), so an example cannot drift from
the code. Every built-in type has at least one example.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trackpipe import config
from trackpipe.destinations.build import validate
from trackpipe.destinations import KINDS

README = Path(__file__).resolve().parents[2] / "README.md"
ROUTING = Path(__file__).resolve().parents[2] / "docs" / "routing.md"


def blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```toml\n(.*?)```", text, re.S)


EXAMPLES = blocks(README, "Destinations") + blocks(ROUTING)


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_is_a_valid_config(tmp_path, example):
    path = tmp_path / "trackpipe.toml"
    path.write_text(example)
    settings = config.load(path, env={})
    assert settings.destinations
    validate(settings)


def test_every_built_in_type_has_an_example(tmp_path):
    shown = set()
    for i, example in enumerate(EXAMPLES):
        path = tmp_path / f"{i}.toml"
        path.write_text(example)
        shown |= {d.type for d in config.load(path, env={}).destinations}
    assert shown >= set(KINDS), f"no README example for {set(KINDS) - shown}"


def commands(path: Path) -> list[list[str]]:
    """Every `trackpipe ...` line of the ```sh blocks, split as a shell would."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["trackpipe"]:
                found.append(words)
    return found


def test_commands_that_need_the_destinations_config_pass_it():
    """`destinations`, `check` and `replay` know the destinations only from --config: an
    example without it fails when pasted ("No destination is named ...")."""
    shown = [c for path in (README, *ROUTING.parent.glob("*.md")) for c in commands(path)
             if c[1] in ("destinations", "check", "replay")]
    assert {c[1] for c in shown} == {"destinations", "check", "replay"}
    missing = [" ".join(c) for c in shown if "--config" not in c]
    assert not missing, f"examples without --config: {missing}"
