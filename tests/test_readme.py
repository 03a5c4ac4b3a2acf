"""Every ```python block of the README runs on its own, exactly as printed."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_readme_has_its_code_blocks():  # so that a changed fence cannot empty the test
    assert len(readme_blocks()) >= 7


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_every_readme_code_block_runs_as_printed(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may write a file
    code = readme_blocks()[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {})
