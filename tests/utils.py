"""Helpers shared by the tests: random layouts, error measures, per-dtype tolerances."""

from __future__ import annotations

import torch

from sparse_attn import BlockSparseLayout

# Relative-error bounds (||out - ref|| / ||ref|| against a float64 reference), per input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any(), "output has NaN"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_layout(batch, heads, q_len, kv_len, block=16, causal=True, density=0.5, empty_rows=True,
                  kv_block=None) -> BlockSparseLayout:
    """Random per-(batch, head) block layout; some rows left empty to test the no-key case."""
    kv_block = block if kv_block is None else kv_block
    nq, nk = -(-q_len // block), -(-kv_len // kv_block)
    dense = torch.rand(batch, heads, nq, nk) < density
    if empty_rows and nq > 1:
        dense[..., nq // 2, :] = False
    return BlockSparseLayout.from_dense(dense, q_len, kv_len, (block, kv_block), causal=causal)


def make_qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, heads, q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def import_graph(package_dir):
    """Module -> (modules it imports, names it imports from each), module level and inside functions
    alike, for every module of the package in ``package_dir``; ``from X import Y`` counts as importing
    ``X.Y`` when that is a module, else ``X``."""
    import ast
    from pathlib import Path

    root = Path(package_dir)
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        edges, names = set(), []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")[:len(base.split(".")) - (node.level - 1)]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
                    names.append((target, alias.name))
        graph[name] = ({e for e in edges if e in modules and e != name}, names)
    return graph


def import_cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v][0]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def tiny_llama(vocab_size: int, hidden_size: int = 64, intermediate_size: int = 96, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, positions: int = 1024, seed: int = 0):
    """A random-weight transformers Llama (float32, eval mode, SDPA attention) of a few thousand
    parameters, for CPU tests."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                      intermediate_size=intermediate_size, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=positions)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def run_compile_script(script) -> dict:
    """Run a kernel-compiling script (``tests/backends/compile_kernels.py``,
    ``tests/decode/compile_decode_kernels.py``) in a fresh process with the interpreter off and
    return the JSON its last line prints; skips where Triton has no NVIDIA backend, fails with the
    script's error output where it fails."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 or not run.stdout.strip():
        if "nvidia" in run.stderr.lower() and "backend" in run.stderr.lower():
            pytest.skip(f"Triton has no NVIDIA backend here: {run.stderr[-300:]}")
        pytest.fail(f"compile script failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
