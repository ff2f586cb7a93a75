"""Every Python block in README.md and in the docs pages with runnable examples runs as written,
copied alone, in a fresh interpreter (on CPU here; the blocks pick the GPU when there is one)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
BLOCKS = [block for page in (README, ROOT / "docs" / "decode.md", ROOT / "docs" / "dsa.md")
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_readme_has_python_blocks():
    assert len(re.findall(r"```python\n", README.read_text())) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, f"block {index} failed:\n{BLOCKS[index]}\n{result.stderr[-3000:]}"
