"""Probe: a Gluon (Triton 3.6) block-sparse attention forward for Hopper, to measure whether issuing
the next tile's score matmul before this tile's softmax (FA3's intra-warpgroup overlap, which tl.dot
cannot express) pays. Restrictions: causal, q_len == kv_len, length a multiple of 128, 128x128
layout blocks, head dim 128, bf16, no LSE output.

    PYTHONPATH=src python docs/results/gluon_forward_probe_session14.py                 # H100: check + time
    python docs/results/gluon_forward_probe_session14.py --compile-only  # sm_90 compile, no GPU needed

Archived (session 14, 2026-11-24): the library's version is src/sparse_attn/backends/triton/
gluon_forward.py (the variant this found fastest, 128x64 tiles, 8 warps, 2 stages, no overlap,
generalized to masks, LSE, GQA layouts and q_len != kv_len). Results:
gluon_forward_variants_h100_2026-11-24_session14.json.
"""
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, overlap, stages); BLOCK_M 64 runs 4 warps (one warpgroup), 128 runs 8.
VARIANTS = [(m, n, o, st) for m in (64, 128) for n in (64, 128) for o in (False, True) for st in (2, 3)]


@gluon.jit
def _softmax_tile(s, m_i, scale_log2, rows, n0, qb_row0, DIAG: gl.constexpr, s_layout: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    """Online-softmax step on a score tile: new row max and unnormalized probabilities."""
    if DIAG:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
    p = gl.exp2(s * scale_log2 - m_new[:, None])
    return m_new, p


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, O, CNT, IDX,
                     stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
                     seq, H, GROUP, scale_log2,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     KV_BLOCK: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                     num_warps: gl.constexpr):
    SUB: gl.constexpr = KV_BLOCK // BLOCK_N
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest causal rows first
    m0 = pid_m * BLOCK_M
    qb = m0 // KV_BLOCK
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    n_blocks = gl.load(CNT + b * stride_cb + h * stride_ch + qb)
    idx_row = IDX + b.to(gl.int64) * stride_ib + h * stride_ih + qb.to(gl.int64) * stride_iq
    n_tiles = n_blocks * SUB

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES + 1):
        mbarrier.init(bars.index(i), count=1)

    q_row0 = pid_bh * seq + m0
    kv_row0 = (b * (H // GROUP) + kvh) * seq
    mbarrier.expect(bars.index(STAGES), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], bars.index(STAGES), q_smem)
    kv_bytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    # Prologue: the first STAGES - 1 tiles.
    for t in gl.static_range(STAGES - 1):
        if t < n_tiles:
            kb = gl.load(idx_row + t // SUB)
            row = kv_row0 + kb * KV_BLOCK + (t % SUB) * BLOCK_N
            mbarrier.expect(bars.index(t), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [row, 0], bars.index(t), k_smem.index(t))
            tma.async_copy_global_to_shared(v_desc, [row, 0], bars.index(t), v_smem.index(t))
    mbarrier.wait(bars.index(STAGES), 0)

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    if OVERLAP:
        # Tile 0: scores, softmax; its P x V is issued in the next iteration, beside that one's scores.
        mbarrier.wait(bars.index(0), 0)
        kb0 = gl.load(idx_row)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        if kb0 == qb:
            m_i, p = _softmax_tile(s, m_i, scale_log2, rows, kb0 * KV_BLOCK, 0, True, s_layout, BLOCK_N)
        else:
            m_i, p = _softmax_tile(s, m_i, scale_log2, rows, kb0 * KV_BLOCK, 0, False, s_layout, BLOCK_N)
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        for t in range(1, n_tiles):
            st = t % STAGES
            # Refill the stage tile t - 2 used (its P x V finished last iteration).
            tn = t + STAGES - 2
            if tn < n_tiles:
                sn = tn % STAGES
                kbn = gl.load(idx_row + tn // SUB)
                row = kv_row0 + kbn * KV_BLOCK + (tn % SUB) * BLOCK_N
                mbarrier.expect(bars.index(sn), kv_bytes)
                tma.async_copy_global_to_shared(k_desc, [row, 0], bars.index(sn), k_smem.index(sn))
                tma.async_copy_global_to_shared(v_desc, [row, 0], bars.index(sn), v_smem.index(sn))
            mbarrier.wait(bars.index(st), (t // STAGES) & 1)
            kb = gl.load(idx_row + t // SUB)
            n0 = kb * KV_BLOCK + (t % SUB) * BLOCK_N
            s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_prev, v_smem.index((t - 1) % STAGES), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            if kb == qb:
                m_new, p = _softmax_tile(s, m_i, scale_log2, rows, n0, 0, True, s_layout, BLOCK_N)
            else:
                m_new, p = _softmax_tile(s, m_i, scale_log2, rows, n0, 0, False, s_layout, BLOCK_N)
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_prev = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = warpgroup_mma(p_prev, v_smem.index((n_tiles - 1) % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    else:
        for t in range(0, n_tiles):
            st = t % STAGES
            tn = t + STAGES - 1
            if tn < n_tiles:
                sn = tn % STAGES
                kbn = gl.load(idx_row + tn // SUB)
                row = kv_row0 + kbn * KV_BLOCK + (tn % SUB) * BLOCK_N
                mbarrier.expect(bars.index(sn), kv_bytes)
                tma.async_copy_global_to_shared(k_desc, [row, 0], bars.index(sn), k_smem.index(sn))
                tma.async_copy_global_to_shared(v_desc, [row, 0], bars.index(sn), v_smem.index(sn))
            mbarrier.wait(bars.index(st), (t // STAGES) & 1)
            kb = gl.load(idx_row + t // SUB)
            n0 = kb * KV_BLOCK + (t % SUB) * BLOCK_N
            s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            if kb == qb:
                m_new, p = _softmax_tile(s, m_i, scale_log2, rows, n0, 0, True, s_layout, BLOCK_N)
            else:
                m_new, p = _softmax_tile(s, m_i, scale_log2, rows, n0, 0, False, s_layout, BLOCK_N)
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(st), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    for i in gl.static_range(STAGES + 1):
        mbarrier.invalidate(bars.index(i))
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    offs_m = gl.arange(0, BLOCK_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = O + (q_row0 + offs_m).to(gl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    gl.store(ptrs, out.to(gl.bfloat16))


def layouts(block_m, block_n, dim):
    return (gl.NVMMASharedLayout.get_default_for([block_m, dim], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([block_n, dim], gl.bfloat16))


def gluon_forward(q, k, v, layout, block_n=64, overlap=True, stages=3, block_m=128):
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, S, D = q.shape
    Hkv = k.shape[1]
    assert layout.q_block == layout.kv_block == 128 and S % 128 == 0 and layout.causal
    ql, kl = layouts(block_m, block_n, D)
    q2, k2, v2 = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [block_m, D], ql)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, D], kl)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [block_n, D], kl)
    out = torch.empty_like(q)
    cnt, idx = layout.kv_num_blocks, layout.kv_indices
    assert cnt.shape[1] == H
    grid = (S // block_m, B * H)
    gluon_fwd_kernel[grid](q_desc, k_desc, v_desc, out, cnt, idx,
                           cnt.stride(0) if cnt.shape[0] > 1 else 0, cnt.stride(1),
                           idx.stride(0) if idx.shape[0] > 1 else 0, idx.stride(1), idx.stride(2),
                           S, H, H // Hkv, D ** -0.5 * LOG2E,
                           BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, KV_BLOCK=128, STAGES=stages,
                           OVERLAP=overlap, num_warps=block_m // 16)
    return out


def compile_only():
    import re
    import subprocess
    import tempfile
    import os
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    for block_n in (64, 128):
        ql, kl = layouts(128, block_n, 128)
        sig = {"q_desc": f"tensordesc<bf16[128, 128],{ql!r}>", "k_desc": f"tensordesc<bf16[{block_n}, 128],{kl!r}>",
               "v_desc": f"tensordesc<bf16[{block_n}, 128],{kl!r}>", "O": "*bf16", "CNT": "*i32", "IDX": "*i32",
               "stride_cb": "i32", "stride_ch": "i32", "stride_ib": "i32", "stride_ih": "i32", "stride_iq": "i32",
               "seq": "i32", "H": "i32", "GROUP": "i32", "scale_log2": "fp32"}
        for overlap in (False, True):
            params = list(sig) + ["BLOCK_M", "BLOCK_N", "HEAD_DIM", "KV_BLOCK", "STAGES", "OVERLAP", "num_warps"]
            values = dict(BLOCK_M=128, BLOCK_N=block_n, HEAD_DIM=128, KV_BLOCK=128, STAGES=3, OVERLAP=overlap,
                          num_warps=8)
            full_sig = {p: sig.get(p, "constexpr") for p in params}
            constexprs = {(i,): values[p] for i, p in enumerate(params) if p in values}
            c = triton.compile(GluonASTSource(fn=gluon_fwd_kernel, signature=full_sig, constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            ptx = c.asm["ptx"]
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
            res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True).stderr
            waits = re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)
            regs = re.findall(r"Used (\d+) registers", res)
            spills = re.findall(r"(\d+) bytes spill stores", res)
            print(f"BLOCK_N={block_n} overlap={overlap}: regs {regs} spills {spills} waits {waits}")


def main():
    import torch

    sys.path.insert(0, "src")
    from sparse_attn import random_layout, sparse_attention
    from sparse_attn.backends.flex import _compiled_flex

    results = []
    for S, dens in ((32768, 0.1), (32768, 0.02), (131072, 0.1), (131072, 0.02)):
        torch.manual_seed(0)
        q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        layout = random_layout(S, density=dens, num_heads=32, block_size=128, seed=1, device="cuda")
        with torch.no_grad():
            ref = sparse_attention(q, k, v, layout, backend="triton")
            t_ref = triton.testing.do_bench(lambda: sparse_attention(q, k, v, layout, backend="triton"),
                                            warmup=25, rep=200, return_mode="median")
        flex = _compiled_flex()
        bm = layout.to_flex_block_mask(num_heads=32)
        with torch.no_grad():
            t_flex = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True),
                                             warmup=25, rep=200, return_mode="median")
        row = {"S": S, "density": dens, "triton_ms": t_ref, "flex_ms": t_flex}
        print(S, dens, f"triton {t_ref:.3f} ms, flex {t_flex:.3f} ms", flush=True)
        for block_m, block_n, overlap, stages in VARIANTS:
            name = f"gluon_m{block_m}_n{block_n}_{'overlap' if overlap else 'sync'}_s{stages}"
            try:
                out = gluon_forward(q, k, v, layout, block_n, overlap, stages, block_m)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                t = triton.testing.do_bench(lambda: gluon_forward(q, k, v, layout, block_n, overlap, stages, block_m),
                                            warmup=25, rep=200, return_mode="median")
                row[name] = {"ms": t, "rel_err_vs_triton": err, "triton_over_gluon": t_ref / t,
                             "flex_over_gluon": t_flex / t}
                print(f"  {name}: {t:.3f} ms, err {err:.1e}, triton/gluon {t_ref / t:.3f}, flex/gluon {t_flex / t:.3f}",
                      flush=True)
            except Exception as exc:
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {name}: {row[name]}", flush=True)
        print({kk: vv for kk, vv in row.items() if not isinstance(vv, dict)}, flush=True)
        results.append(row)
    import json
    import os
    json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp"), "gluon_fwd_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:
        main()
