"""Every decode kernel compiles for a Hopper GPU (sm_90) on a CPU: the page-score kernel with and
without the fused append (Quest exact and int8, pooled), the top-k kernel, the index append kernel,
the split-KV decode kernel (contiguous and paged) and the merge kernel. The interpreter tests run
the kernels as Python and cannot see errors only the compiler raises; Triton ships its NVIDIA
backend and ``ptxas``, so this compiles each one to a cubin without a GPU
(``compile_decode_kernels.py``, in its own process)."""

from pathlib import Path

import pytest
from utils import run_compile_script

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_decode_kernels.py")
KERNELS = [f"page_logits-{s}-{a}" for s in ("quest", "quest_int8", "pooled") for a in ("plain", "append")] + [
    "select_pages-plain", "select_pages-lengths",
    *(f"append-{b}-{p}" for b in ("exact", "int8") for p in ("lengths", "positions")),
    "decode_split-contiguous", "decode_split-paged", "decode_merge"]


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(SCRIPT)


@pytest.mark.parametrize("name", KERNELS)
def test_decode_kernel_compiles_for_sm90(compiled, name):
    assert compiled[name]["ok"], compiled[name].get("error")
