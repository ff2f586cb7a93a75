"""The Triton kernels compile for a Hopper GPU (sm_90), tensor-descriptor paths included, and for an
Ampere GPU (sm_80, pointer loads: the path other CUDA GPUs take), on a CPU.

The interpreter (the other kernel tests) runs kernels as Python and so cannot see errors that only
the compiler raises (a ``return`` the front end rejects, a layout the GPU passes refuse). Triton
ships its NVIDIA backend and ``ptxas``, so CI compiles each kernel to a cubin without a GPU
(``tests/compile_kernels.py``, in its own process).
"""

from pathlib import Path

import pytest
from utils import run_compile_script

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.fixture(scope="module")
def compile_results():
    return run_compile_script(SCRIPT)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("name", ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"])
def test_kernel_compiles_for_sm90(compile_results, name, tma):
    result = compile_results[f"{name}-{'tma' if tma else 'pointers'}"]
    assert result["ok"], result.get("error")
    assert result["wgmma"], "no Hopper tensor-core (wgmma) instructions in the PTX"
    # Tile loads through tensor descriptors exactly when asked for.
    assert (result["bulk_tensor_loads"] > 0) == tma, result


@pytest.mark.parametrize("name", ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"])
def test_pointer_path_compiles_for_sm80(compile_results, name):
    """GPUs before Hopper get no descriptors (``_use_tma``); their path must still compile."""
    result = compile_results[f"{name}-sm80"]
    assert result["ok"], result.get("error")
    assert result["mma_sync"] and not result["wgmma"], result


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("kernel", ["gluon_forward", "gluon_forward_m64", "gluon_forward_varlen", "gluon_dq",
                                    "gluon_dkdv"])
def test_gluon_kernel_compiles_for_sm90(compile_results, kernel, dim, causal):
    """The Gluon kernels (they cannot run in the interpreter; GPU tests check their numbers)
    compile to wgmma and TMA loads."""
    result = compile_results[f"{kernel}-d{dim}-{'causal' if causal else 'full'}"]
    if not result["ok"] and result["error"].startswith("Gluon unavailable"):
        pytest.skip(result["error"])
    assert result["ok"], result.get("error")
    assert result["wgmma"] and result["bulk_tensor_loads"] > 0, result
