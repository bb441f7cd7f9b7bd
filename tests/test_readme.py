"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has a python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "tensor" in capsys.readouterr().out
