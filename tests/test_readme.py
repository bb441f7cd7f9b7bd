"""The README and docs/ say what the code does: every Python example runs and prints exactly the
output shown under it, and every `tree-pruned` and `make` command they show exists."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tree_attn_backend.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(page: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(page.read_text())]


def _examples() -> list[tuple[str, str, str]]:
    """``(page, code, shown output)`` for every python block; its output block is the ```text
    block right after it (a python block without one must print nothing)."""
    examples = []
    for page in PAGES:
        blocks = _blocks(page)
        for i, (lang, body) in enumerate(blocks):
            if lang == "python":
                shown = blocks[i + 1][1] if i + 1 < len(blocks) and blocks[i + 1][0] == "text" else ""
                examples.append((page.name, body, shown))
    return examples


def _commands(prefix: str) -> list[tuple[str, list[str]]]:
    """Every command line of the bash blocks that starts with ``prefix`` (after a path)."""
    found = []
    for page in PAGES:
        for lang, body in _blocks(page):
            if lang != "bash":
                continue
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("#", 1)[0])
                cut = next((i for i, w in enumerate(words) if w in (">", ">>", "|", "&&")), len(words))
                if words and Path(words[0]).name == prefix:
                    found.append((page.name, words[1:cut]))
    return found


def test_pages_have_examples_and_commands():
    assert any(page == "README.md" for page, _, _ in EXAMPLES)
    assert _commands("tree-pruned") and _commands("make")


EXAMPLES = _examples()


@pytest.mark.parametrize("page, code, shown", EXAMPLES, ids=[f"{page}-{i}" for i, (page, _, _) in enumerate(EXAMPLES)])
def test_example_prints_what_the_page_shows(page, code, shown):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, page, "exec"), {})
    assert printed.getvalue() == shown


def test_every_tree_pruned_command_parses():
    for page, argv in _commands("tree-pruned"):
        # Extra arguments after `fuzz` go to pytest and after `serve` to vLLM.
        try:
            parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page}: tree-pruned {' '.join(argv)} does not parse")


def test_every_make_target_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for page, argv in _commands("make"):
        assert argv and set(argv) <= targets, f"{page}: make {' '.join(argv)}"
