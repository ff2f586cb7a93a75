"""KernelOptions: validated, passed per call, one context manager for the default, no import-time
global state."""

import subprocess
import sys
import threading

import pytest
import torch

from sparse_attn import KernelOptions, kernel_options, sparse_attention
from sparse_attn.options import current_kernel_options, resolve_kernel_options
from utils import random_layout


@pytest.mark.parametrize("field,value", [("forward", "fast"), ("backward", None), ("forward_tma", "yes"),
                                         ("backward_tma", 1), ("fast_launch", None),
                                         ("estimator_kernels", "cuda"), ("dense", "cudnn_v9")])
def test_bad_options_name_the_field_and_the_choices(field, value):
    with pytest.raises(ValueError, match=f"KernelOptions.{field} must be"):
        KernelOptions(**{field: value})


def test_options_are_frozen_and_replace_validates():
    options = KernelOptions()
    with pytest.raises(Exception):
        options.forward = "triton"
    assert options.replace(forward="triton").forward == "triton"
    with pytest.raises(ValueError, match="KernelOptions.backward"):
        options.replace(backward="x")


def test_kernel_options_sets_the_default_inside_the_block_only():
    assert current_kernel_options() == KernelOptions()
    with kernel_options(forward="triton") as chosen:
        assert chosen.forward == "triton" and current_kernel_options() is chosen
        with kernel_options(KernelOptions(backward="triton")):
            assert current_kernel_options() == KernelOptions(backward="triton")
        assert current_kernel_options() is chosen
    assert current_kernel_options() == KernelOptions()
    explicit = KernelOptions(fast_launch=False)
    with kernel_options(forward="triton"):
        assert resolve_kernel_options(explicit) is explicit  # an explicit argument wins
    with pytest.raises(TypeError, match="kernel_options must be a KernelOptions"):
        resolve_kernel_options({"forward": "triton"})


def test_kernel_options_default_is_per_thread():
    seen = []
    with kernel_options(forward="triton"):
        thread = threading.Thread(target=lambda: seen.append(current_kernel_options()))
        thread.start()
        thread.join()
    assert seen == [KernelOptions()]


def test_sparse_attention_checks_its_kernel_options():
    q = k = v = torch.randn(1, 1, 32, 16)
    layout = random_layout(1, 1, 32, 32, block=16)
    with pytest.raises(TypeError, match="kernel_options must be a KernelOptions"):
        sparse_attention(q, k, v, layout, kernel_options="triton")


def test_importing_changes_no_global_setting():
    """Importing sparse_attn (and building its backends) leaves torch's dynamo limits and Triton
    alone."""
    code = ("import torch; before = dict(torch._dynamo.config.get_config_copy()); "
            "import sparse_attn, sparse_attn.backends.triton.ops, sparse_attn.backends.flex; "
            "after = dict(torch._dynamo.config.get_config_copy()); "
            "print(sorted(k for k in before if before[k] != after.get(k)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
