"""decode_attention (reference and Triton backends) against a float64 golden written here: a dense
softmax over the token mask each (sequence, query head, query) gets from its KV group's selected
pages, in Python loops on tiny shapes. Triton runs in the CPU interpreter; GPU-only checks are
marked ``gpu``. Every ``torch.empty`` buffer starts as NaN (``poison_empty``), and cache rows past
``cache_lens`` and unused paged blocks hold NaN, so anything read or left unwritten shows up."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_attn import KernelOptions
from sparse_attn.decode import DecodeWorkspace, decode_attention
from sparse_attn.decode.kernels import choose_num_splits, triton_decode_attention
from utils import TOLERANCE, rel_error

pytestmark = pytest.mark.usefixtures("poison_empty")

HALF = (torch.float16, torch.bfloat16)
LSE_TOL = {torch.float64: 2e-6,  # the LSE is float32 for every dtype
            torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
GARBAGE = (-2 ** 31, 2 ** 31 - 1, 1 << 20, -1)


def golden(q, k, v, pages, counts, lens, page_size, scale):
    """Float64 attention from the token mask of the selected pages (contiguous cache)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, s_max = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    lse = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        length = int(lens[b])
        for h in range(heads):
            kvh = h // group
            selected = [int(p) for p in pages[b, kvh, :int(counts[b, kvh])]]
            for i in range(q_len):
                mask = torch.zeros(s_max, dtype=torch.bool)
                q_pos = length - q_len + i
                for p in selected:
                    for t in range(p * page_size, (p + 1) * page_size):
                        if t <= q_pos:
                            mask[t] = True
                if not mask.any():
                    continue
                keys, values = k[b, kvh][mask].double(), v[b, kvh][mask].double()
                s = keys @ q[b, h, i].double() * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ values
    return out, lse


def make_case(batch=2, kv_heads=2, group=2, q_len=1, dim=32, page_size=16, dtype=torch.float16,
              lens=(75, 37), budget=4, empty=((1, 0),), last_page=True, extra_pages=2):
    """Random q and contiguous cache (rows past each cache length are NaN), random sorted page
    selections of up to ``budget`` pages (the last page too, with ``last_page``), padding slots
    full of garbage; ``empty`` lists (b, kvh) rows given no page."""
    lens_t = torch.tensor(lens[:batch], dtype=torch.int32)
    max_blocks = math.ceil(max(lens) / page_size) + extra_pages
    s_max = max_blocks * page_size
    q = torch.randn(batch, kv_heads * group, q_len, dim).to(dtype)
    k = torch.randn(batch, kv_heads, s_max, dim).to(dtype)
    v = torch.randn(batch, kv_heads, s_max, dim).to(dtype)
    for b in range(batch):
        k[b, :, int(lens_t[b]):] = float("nan")
        v[b, :, int(lens_t[b]):] = float("nan")
    pages = torch.empty(batch, kv_heads, budget + 1, dtype=torch.int32)
    pages.copy_(torch.tensor(GARBAGE * (budget + 1))[:budget + 1].expand_as(pages))
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b in range(batch):
        n_avail = math.ceil(int(lens_t[b]) / page_size)
        for h in range(kv_heads):
            if (b, h) in empty:
                continue
            n = int(torch.randint(1, min(budget, n_avail) + 1, ()))
            chosen = torch.randperm(n_avail)[:n]
            if last_page and (n_avail - 1) not in chosen.tolist():
                chosen[-1] = n_avail - 1
            chosen = chosen.sort().values
            pages[b, h, :n] = chosen.int()
            counts[b, h] = n
    return q, k, v, pages, counts, lens_t


def to_paged(k, v, lens, page_size):
    """The same cache as (num_blocks, page_size, Hkv, D) blocks in shuffled order, with NaN spare
    blocks; block_table entries of pages past a sequence's length are -1 (never read)."""
    batch, kv_heads, s_max, dim = k.shape
    max_blocks = s_max // page_size
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks)[:batch * max_blocks].view(batch, max_blocks)
    kp = torch.full((num_blocks, page_size, kv_heads, dim), float("nan"), dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    table = perm.clone().int()
    for b in range(batch):
        for p in range(max_blocks):
            rows = slice(p * page_size, (p + 1) * page_size)
            kp[perm[b, p]] = k[b, :, rows].transpose(0, 1)
            vp[perm[b, p]] = v[b, :, rows].transpose(0, 1)
            if p * page_size >= int(lens[b]):
                table[b, p] = -1
    return kp, vp, table


def check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert rel_error(out, ref_out) < TOLERANCE[dtype]
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must be exactly the -inf LSE rows"
    assert (out[empty] == 0).all()
    assert not torch.isnan(lse).any()
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() < LSE_TOL[dtype] if (~empty).any() else True


def run(case, backend, page_size, scale=None, **kw):
    q, k, v, pages, counts, lens = case
    return decode_attention(q, k, v, pages, counts, lens, page_size=page_size, scale=scale, backend=backend,
                            return_lse=True, **kw)


# --- reference backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("page_size", [16, 32])
def test_reference_matches_golden(dtype, group, q_len, page_size):
    case = make_case(group=group, q_len=q_len, page_size=page_size, dtype=dtype, lens=(75, 40))
    ref = golden(*case, page_size, 0.3)
    check(*run(case, "reference", page_size, scale=0.3), *ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_paged_equals_contiguous(dtype):
    case = make_case(kv_heads=2, group=2, q_len=4, dtype=dtype, lens=(75, 37))
    q, k, v, pages, counts, lens = case
    kp, vp, table = to_paged(k, v, lens, 16)
    contiguous = run(case, "reference", 16)
    paged = run((q, kp, vp, pages, counts, lens), "reference", 16, block_table=table)
    assert torch.equal(contiguous[0], paged[0]) and torch.equal(contiguous[1], paged[1])
    check(*paged, *golden(*case, 16, 1 / math.sqrt(32)), dtype)


def test_auto_on_cpu_runs_reference():
    case = make_case(dtype=torch.float16)
    auto = run(case, "auto", 16)
    ref = run(case, "reference", 16)
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
    q, k, v, pages, counts, lens = case
    out = decode_attention(q, k, v, pages, counts, lens, page_size=16)  # return_lse=False: out only
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref[0])


# --- Triton backend (CPU interpreter) ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("group,q_len,page_size", [(1, 1, 16), (2, 4, 32), (4, 1, 32), (4, 4, 16), (2, 1, 16),
                                                   (1, 4, 32)])
def test_triton_matches_golden(dtype, group, q_len, page_size):
    case = make_case(group=group, q_len=q_len, page_size=page_size, dtype=dtype, lens=(75, 40))
    check(*run(case, "triton", page_size), *golden(*case, page_size, 1 / math.sqrt(32)), dtype)


@pytest.mark.parametrize("page_size,lens", [(64, (300, 130)), (128, (300, 129)), (256, (600, 257))])
@pytest.mark.parametrize("block_n", [64, 128])
def test_triton_pages_larger_than_a_tile(page_size, lens, block_n):
    """Pages of 64..256 tokens are walked in tiles of 64 or 128 keys."""
    case = make_case(group=2, q_len=3, dim=16, page_size=page_size, dtype=torch.float16, lens=lens, budget=3)
    out = triton_decode_attention(*case, page_size, 0.3, block_n=block_n)
    check(*out, *golden(*case, page_size, 0.3), torch.float16)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("block_n", [64, 128])
def test_triton_many_pages_per_row(num_splits, block_n):
    """Up to 14 pages of 16 tokens per row: several unmasked tiles of 4 or 8 pages, then the masked
    tail, wherever the split boundaries fall."""
    case = make_case(group=2, q_len=2, dim=16, page_size=16, dtype=torch.float16, lens=(300, 170), budget=14,
                     empty=())
    q, k, v, pages, counts, lens = case
    counts[0, 0] = 14  # all but a few pages of the first row
    pages[0, 0, :14] = torch.tensor([0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 16, 18], dtype=torch.int32)
    out = triton_decode_attention(q, k, v, pages, counts, lens, 16, 0.3, num_splits=num_splits, block_n=block_n)
    check(*out, *golden(*case, 16, 0.3), torch.float16)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("paged", [False, True])
def test_triton_splits_and_paged_cache(num_splits, paged):
    """Any split count (8: more splits than some rows have pages, so some splits are empty) and the
    shuffled paged cache give the golden result; paged and contiguous agree bit for bit."""
    page_size, dtype = 16, torch.float16
    case = make_case(group=2, q_len=4, page_size=page_size, dtype=dtype, lens=(90, 21), budget=5)
    q, k, v, pages, counts, lens = case
    scale = 1 / math.sqrt(32)
    contiguous = triton_decode_attention(q, k, v, pages, counts, lens, page_size, scale, num_splits=num_splits)
    check(*contiguous, *golden(*case, page_size, scale), dtype)
    if paged:
        kp, vp, table = to_paged(k, v, lens, page_size)
        out = triton_decode_attention(q, kp, vp, pages, counts, lens, page_size, scale, block_table=table,
                                      num_splits=num_splits)
        assert torch.equal(out[0], contiguous[0]) and torch.equal(out[1], contiguous[1])


@pytest.mark.parametrize("paged", [False, True])
def test_triton_pipelining_stages_do_not_change_the_result(paged):
    """The split kernel's software-pipelining stages are a scheduling choice: one stage (the default)
    and Triton's three give the golden result, bit for bit the same."""
    page_size, dtype = 16, torch.bfloat16
    case = make_case(group=4, q_len=2, page_size=page_size, dtype=dtype, lens=(90, 37), budget=5)
    q, k, v, pages, counts, lens = case
    kw = {}
    if paged:
        k, v, kw["block_table"] = to_paged(k, v, lens, page_size)
    one, three = (triton_decode_attention(q, k, v, pages, counts, lens, page_size, 0.3, num_splits=2,
                                          num_stages=stages, **kw) for stages in (1, 3))
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    check(*one, *golden(*case, page_size, 0.3), dtype)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("paged", [False, True])
def test_triton_merge_in_the_split_kernel(num_splits, paged):
    """With a workspace the last split of each row merges the partials in the split kernel (a
    running maximum instead of the merge kernel's two passes): the result agrees with the separate
    merge kernel's to float32 rounding and with the golden one, with empty splits and an empty row,
    and every arrival counter is back to 0 afterwards."""
    page_size, dtype = 16, torch.float16
    case = make_case(group=2, q_len=4, page_size=page_size, dtype=dtype, lens=(90, 21), budget=5)
    q, k, v, pages, counts, lens = case
    kw = {}
    if paged:
        k, v, kw["block_table"] = to_paged(k, v, lens, page_size)
    workspace = DecodeWorkspace("cpu", rows=1)  # grows to the call's 4 rows
    separate = triton_decode_attention(q, k, v, pages, counts, lens, page_size, 0.3, num_splits=num_splits, **kw)
    fused = triton_decode_attention(q, k, v, pages, counts, lens, page_size, 0.3, num_splits=num_splits,
                                    workspace=workspace, **kw)
    assert workspace.rows >= 4 and not workspace.arrival_counters(4).any()
    torch.testing.assert_close(fused[0], separate[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused[1], separate[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isinf(fused[1]), torch.isinf(separate[1]))
    check(*fused, *golden(*case, page_size, 0.3), dtype)
    # The counters are reusable: a second call gives the same result.
    again = triton_decode_attention(q, k, v, pages, counts, lens, page_size, 0.3, num_splits=num_splits,
                                    workspace=workspace, **kw)
    assert torch.equal(again[0], fused[0])


def test_triton_merge_in_the_split_kernel_row_tiles():
    """Several row tiles per (sequence, KV head): one counter each."""
    case = make_case(kv_heads=1, group=9, q_len=16, dim=16, dtype=torch.float16, lens=(70, 53), budget=4,
                     empty=())
    workspace = DecodeWorkspace("cpu")
    got = run(case, "triton", 16, scale=0.25, workspace=workspace)
    check(*got, *golden(*case, 16, 0.25), torch.float16)
    assert not workspace.arrival_counters(workspace.rows).any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_output_into_a_given_tensor_and_int64_cache_lens(backend):
    """``out=`` a transposed view of a (B, Sq, H, D) buffer is written in place and returned, and
    int64 cache lengths (a page index's lengths) give the same result as int32 ones."""
    case = make_case(group=2, q_len=3, page_size=16, dtype=torch.bfloat16, lens=(90, 37), budget=4)
    q, k, v, pages, counts, lens = case
    want = decode_attention(q, k, v, pages, counts, lens, page_size=16, backend=backend)
    buffer = torch.full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"), dtype=q.dtype)
    got = decode_attention(q, k, v, pages, counts, lens.long(), page_size=16, backend=backend,
                           out=buffer.transpose(1, 2))
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer.transpose(1, 2), want)


def test_output_tensor_errors():
    q, k, v, pages, counts, lens = make_case(lens=(40, 20), budget=2)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        decode_attention(q, k, v, pages, counts, lens, page_size=16, out=[1])
    wider = q.new_empty(*q.shape[:3], q.shape[3] + 1)
    strided = q.new_empty(*q.shape[:3], 2 * q.shape[3])[..., ::2]
    for bad in (wider, torch.empty_like(q, dtype=torch.float32), strided):
        with pytest.raises(ValueError, match="out must be a"):
            decode_attention(q, k, v, pages, counts, lens, page_size=16, out=bad)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        decode_attention(q, k, v, pages, counts, lens, page_size=16, out=q)


def test_workspace_errors():
    case = make_case()
    with pytest.raises(TypeError, match="workspace must be a DecodeWorkspace"):
        run(case, "triton", 16, workspace=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        DecodeWorkspace("cpu", rows=0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="workspace is on device"):
            run(case, "triton", 16, workspace=DecodeWorkspace("cuda"))


def test_triton_paged_through_public_api():
    case = make_case(group=4, q_len=2, dtype=torch.bfloat16, lens=(50, 77))
    q, k, v, pages, counts, lens = case
    kp, vp, table = to_paged(k, v, lens, 16)
    got = run((q, kp, vp, pages, counts, lens), "triton", 16, block_table=table)
    check(*got, *golden(*case, 16, 1 / math.sqrt(32)), torch.bfloat16)


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_triton_head_dims(dim):
    case = make_case(group=2, q_len=2, dim=dim, dtype=torch.float16, lens=(40, 33), budget=2)
    check(*run(case, "triton", 16), *golden(*case, 16, 1 / math.sqrt(dim)), torch.float16)


def test_triton_row_tiles_and_odd_group():
    """GROUP * Sq over 128 rows takes several row tiles; a group of 3 pads its rows."""
    case = make_case(kv_heads=1, group=9, q_len=16, dim=16, dtype=torch.float16, lens=(40, 33), budget=2,
                     empty=())
    check(*run(case, "triton", 16), *golden(*case, 16, 0.25), torch.float16)
    case = make_case(kv_heads=2, group=3, q_len=3, dim=16, dtype=torch.float16, lens=(40, 33), budget=2)
    check(*run(case, "triton", 16), *golden(*case, 16, 0.25), torch.float16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_causal_page_boundaries(backend):
    """First query positions just before, at and after page ends (46..48, 62..64 with 16-token
    pages, Sq 4, every page selected): which pages need the causal mask changes right there."""
    first = (46, 47, 48, 62, 63, 64)
    lens = tuple(f + 4 for f in first)
    case = make_case(batch=6, group=2, q_len=4, dtype=torch.float16, lens=lens, budget=5, empty=())
    pages, counts = case[3], case[4]
    for b, length in enumerate(lens):
        n = math.ceil(length / 16)
        pages[b, :, :n] = torch.arange(n, dtype=torch.int32)
        counts[b] = n
    check(*run(case, backend, 16, scale=0.3), *golden(*case, 16, 0.3), torch.float16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_budget_everywhere(backend):
    case = make_case(dtype=torch.float16, empty=((0, 0), (0, 1), (1, 0), (1, 1)))
    out, lse = run(case, backend, 16)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v, pages, counts, lens = case
    zero_width = decode_attention(q, k, v, pages[..., :0], counts, lens, page_size=16, backend=backend,
                                  return_lse=True)
    assert (zero_width[0] == 0).all() and torch.isneginf(zero_width[1]).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_pages_past_the_length_and_garbage_indices(backend):
    """Selected pages wholly past cache_lens add nothing (a row selecting only such a page sees no
    key); queries at the start of a page see only its first keys; a negative scale works."""
    page_size = 16
    q, k, v, pages, counts, lens = make_case(q_len=4, dtype=torch.float16, lens=(64, 36), budget=3, empty=())
    pages[0, 0, :3] = torch.tensor([1, 3, 4], dtype=torch.int32)  # page 4 starts at 64 = cache_lens[0]
    pages[0, 1, :2] = torch.tensor([3, 5], dtype=torch.int32)
    pages[1, 0, :2] = torch.tensor([0, 2], dtype=torch.int32)  # queries at 32..35 see 32..(their own)
    pages[1, 1, :1] = torch.tensor([3], dtype=torch.int32)  # starts at 48, past cache_lens[1] = 36
    counts.copy_(torch.tensor([[3, 2], [2, 1]]))
    case = (q, k, v, pages, counts, lens)
    for scale in (-0.2, 0.4):
        check(*run(case, backend, page_size, scale=scale), *golden(*case, page_size, scale), torch.float16)


def test_triton_noncontiguous_inputs():
    q, k, v, pages, counts, lens = make_case(group=2, q_len=3, dtype=torch.float16)
    expected = golden(q, k, v, pages, counts, lens, 16, 0.2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads outermost-but-one stride
    k_t = k.transpose(0, 1).contiguous().transpose(0, 1)
    counts_t = counts.t().contiguous().t()
    wide = torch.full((*pages.shape[:2], pages.shape[2] * 2), 7, dtype=torch.int32)
    wide[..., ::2] = pages
    check(*run((q_t, k_t, v, wide[..., ::2], counts_t, lens), "triton", 16, scale=0.2), *expected, torch.float16)


def test_kernel_options_accepted():
    case = make_case(dtype=torch.float16)
    a = run(case, "triton", 16, kernel_options=KernelOptions(fast_launch=False))
    b = run(case, "triton", 16)
    assert torch.equal(a[0], b[0])


def test_choose_num_splits():
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 128, 16, cpu) == 1  # enough programs already
    assert choose_num_splits(5, 128, 16, cpu) == 3  # 15 programs within 4 per notional SM (4 SMs)
    assert choose_num_splits(1, 128, 16, cpu) == 16  # 4 per notional SM
    assert choose_num_splits(1, 2, 16, cpu) == 1  # 32 keys of budget: one split
    assert choose_num_splits(1, 0, 16, cpu) == 1
    assert choose_num_splits(1, 3, 256, cpu) == 3  # no more splits than pages


# --- validation -------------------------------------------------------------------------------------

def _valid(paged=False):
    q, k, v, pages, counts, lens = make_case(dtype=torch.float32, lens=(75, 37))
    args = dict(q=q, k_cache=k, v_cache=v, pages=pages, page_counts=counts, cache_lens=lens, page_size=16)
    if paged:
        kp, vp, table = to_paged(k, v, lens, 16)
        args.update(k_cache=kp, v_cache=vp, block_table=table)
    return args


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


CASES = [
    ("q 3-D", lambda a: dict(q=a["q"][0]), "q must be 4-D"),
    ("Sq 0", lambda a: dict(q=a["q"][:, :, :0]), "q must hold 1 to 16"),
    ("Sq 17", lambda a: dict(q=a["q"].expand(-1, -1, 17, -1)), "q must hold 1 to 16"),
    ("q int", lambda a: dict(q=a["q"].int()), "q has dtype"),
    ("k dtype", lambda a: dict(k_cache=a["k_cache"].double()), "k_cache must have q's dtype"),
    ("v dtype", lambda a: dict(v_cache=a["v_cache"].half()), "v_cache must have q's dtype"),
    ("pages int64", lambda a: dict(pages=a["pages"].long()), "pages must be an int32"),
    ("counts int64", lambda a: dict(page_counts=a["page_counts"].long()), "page_counts must be an int32"),
    ("lens float", lambda a: dict(cache_lens=a["cache_lens"].float()), "cache_lens must be an int32 or int64"),
    ("pages device", lambda a: dict(pages=a["pages"].to("meta")), "pages must be on q's device"),
    ("k device", lambda a: dict(k_cache=a["k_cache"].to("meta")), "k_cache must be on q's device"),
    ("page_size 24", lambda a: dict(page_size=24), "page_size"),
    ("page_size 8", lambda a: dict(page_size=8), "page_size"),
    ("page_size 512", lambda a: dict(page_size=512), "page_size"),
    ("page_size float", lambda a: dict(page_size=16.0), "page_size"),
    ("k batch", lambda a: dict(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), "k_cache must be"),
    ("k dim", lambda a: dict(k_cache=a["k_cache"][..., :16]), "k_cache must be"),
    ("v shape", lambda a: dict(v_cache=a["v_cache"][:, :, :-1]), "v_cache must have k_cache's shape"),
    ("gqa", lambda a: dict(q=a["q"][:, :3]), "kv_heads"),
    ("pages shape", lambda a: dict(pages=a["pages"][:, :1]), "pages must be"),
    ("counts shape", lambda a: dict(page_counts=a["page_counts"][:, :1]), "page_counts must be"),
    ("lens shape", lambda a: dict(cache_lens=a["cache_lens"][:1]), "cache_lens must be"),
    ("lens < Sq", lambda a: dict(cache_lens=_set(a["cache_lens"], 1, 0)), "cache_lens must be >="),
    ("lens > capacity", lambda a: dict(cache_lens=_set(a["cache_lens"], 0, 10 ** 6)), "cache_lens must be <="),
    ("counts > width", lambda a: dict(page_counts=_set(a["page_counts"], (0, 0), 99)), "page_counts must be in"),
    ("counts < 0", lambda a: dict(page_counts=_set(a["page_counts"], (1, 0), -1)), "page_counts must be in"),
    ("page < 0", lambda a: dict(pages=_set(a["pages"], (0, 0, 0), -3)), "pages must hold page numbers"),
    ("page too big", lambda a: dict(pages=_set(a["pages"], (0, 0, 0), 1000)), "pages must hold page numbers"),
    ("not increasing", lambda a: dict(pages=_set(a["pages"], (0, 0, slice(0, 2)), 1),
                                      page_counts=_set(a["page_counts"], (0, 0), 2)), "strictly increasing"),
    ("backend", lambda a: dict(backend="cuda"), "backend must be one of"),
    ("triton float32", lambda a: dict(backend="triton"), "backend='triton' cannot run"),
    ("scale nan", lambda a: dict(scale=float("nan")), "scale"),
    ("scale str", lambda a: dict(scale="0.1"), "scale"),
    ("return_lse", lambda a: dict(return_lse="yes"), "return_lse"),
]

PAGED_CASES = [
    ("page_size vs blocks", lambda a: dict(page_size=32), "k_cache must be \\(num_blocks, page_size=32"),
    ("table 1-D", lambda a: dict(block_table=a["block_table"][0]), "block_table must be"),
    ("table batch", lambda a: dict(block_table=a["block_table"][:1]), "block_table must be"),
    ("table dtype", lambda a: dict(block_table=a["block_table"].long()), "block_table must be an int32"),
    ("table narrow", lambda a: dict(block_table=a["block_table"][:, :4]), "cache_lens must be <="),
    ("page past table", lambda a: dict(block_table=a["block_table"][:, :5], cache_lens=_set(a["cache_lens"], 0, 70),
                                       pages=_set(a["pages"], (0, 0, slice(0, 2)), torch.tensor([4, 5])),
                                       page_counts=_set(a["page_counts"], (0, 0), 2)),
     "block_table covers 5 pages"),
    ("block out of range", lambda a: dict(block_table=_set(a["block_table"], (0, 4), 10 ** 4)),
     "block_table entries"),
    ("v blocks", lambda a: dict(v_cache=a["v_cache"][:-1]), "v_cache must have k_cache's shape"),
]


@pytest.mark.parametrize("name,change,match", CASES, ids=[c[0] for c in CASES])
def test_validation_errors(name, change, match):
    args = _valid()
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


@pytest.mark.parametrize("name,change,match", PAGED_CASES, ids=[c[0] for c in PAGED_CASES])
def test_validation_errors_paged(name, change, match):
    args = _valid(paged=True)
    decode_attention(**args)  # the unchanged paged case is valid
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


def test_type_errors():
    args = _valid()
    with pytest.raises(TypeError, match="pages must be a torch.Tensor"):
        decode_attention(**{**args, "pages": [[0]]})
    with pytest.raises(TypeError, match="kernel_options"):
        decode_attention(**args, kernel_options={"fast_launch": True})


# --- GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_kernel_matches_reference_large(dtype, paged):
    """B=8, H=32, Hkv=8, D=128, 32K cache, 2K-token budgets (page 16), Sq 1 and 4; cache lengths
    differ per sequence and are not page multiples."""
    torch.manual_seed(0)
    device, batch, heads, kv_heads, dim, page_size, s_max = "cuda", 8, 32, 8, 128, 16, 32768
    n_budget = 2048 // page_size
    k = torch.randn(batch, kv_heads, s_max, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.randint(s_max // 2, s_max - 16, (batch,), device=device, dtype=torch.int32)
    pages = torch.full((batch, kv_heads, n_budget), -2 ** 31, device=device, dtype=torch.int32)
    counts = torch.randint(n_budget // 2, n_budget + 1, (batch, kv_heads), device=device, dtype=torch.int32)
    counts[0, 0] = 0
    for b in range(batch):
        n_avail = (int(lens[b]) + page_size - 1) // page_size
        for h in range(kv_heads):
            n = int(counts[b, h])
            chosen = torch.randperm(n_avail - 1, device=device)[:max(n - 1, 0)]
            chosen = torch.cat([chosen, torch.tensor([n_avail - 1], device=device)])[-n:] if n else chosen[:0]
            pages[b, h, :n] = chosen.sort().values.int()
    if paged:
        max_blocks = s_max // page_size
        perm = torch.randperm(batch * max_blocks, device=device)
        kc = torch.empty(batch * max_blocks, page_size, kv_heads, dim, device=device, dtype=dtype)
        vc = torch.empty_like(kc)
        kc[perm] = k.view(batch, kv_heads, max_blocks, page_size, dim).permute(0, 2, 3, 1, 4).reshape(kc.shape)
        vc[perm] = v.view(batch, kv_heads, max_blocks, page_size, dim).permute(0, 2, 3, 1, 4).reshape(kc.shape)
        table = perm.view(batch, max_blocks).int()
    else:
        kc, vc, table = k, v, None
    for q_len in (1, 4):
        q = torch.randn(batch, heads, q_len, dim, device=device, dtype=dtype)
        ref = decode_attention(q, k, v, pages, counts, lens, page_size=page_size, backend="reference",
                               return_lse=True)
        out, lse = decode_attention(q, kc, vc, pages, counts, lens, page_size=page_size, block_table=table,
                                    backend="auto", return_lse=True)
        assert rel_error(out, ref[0]) < TOLERANCE[dtype]
        assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))
        finite = torch.isfinite(ref[1])
        assert (lse[finite] - ref[1][finite]).abs().max().item() < 1e-3
        # The split kernel merging by itself (a workspace) agrees with the separate merge, in
        # eager calls and replayed as a CUDA graph.
        workspace = DecodeWorkspace(device)
        fused = decode_attention(q, kc, vc, pages, counts, lens, page_size=page_size, block_table=table,
                                 backend="auto", return_lse=True, workspace=workspace)
        torch.testing.assert_close(fused[0], out, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(fused[1], lse, rtol=1e-5, atol=1e-5)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = decode_attention(q, kc, vc, pages, counts, lens, page_size=page_size, block_table=table,
                                        backend="auto", return_lse=True, workspace=workspace, check_values=False)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed[0], fused[0]) and torch.equal(replayed[1], fused[1])
        assert not workspace.arrival_counters(workspace.rows).any()
        # Later calls launch through the compiled launcher; Triton's own path gives the same bits.
        for options in (KernelOptions(), KernelOptions(fast_launch=False)):
            again = decode_attention(q, kc, vc, pages, counts, lens, page_size=page_size, block_table=table,
                                     backend="auto", return_lse=True, kernel_options=options)
            assert torch.equal(again[0], out) and torch.equal(again[1], lse)


def test_dependent_launch_is_an_option_that_never_applies_in_the_interpreter_or_on_cpu():
    assert KernelOptions().dependent_launch is True  # on by default, where the device has it
    assert not KernelOptions(dependent_launch=True).dependent_launch_on("cpu")
    assert not KernelOptions().dependent_launch_on("cpu")
    assert not KernelOptions(dependent_launch=False).dependent_launch_on("cpu")
    with pytest.raises(ValueError, match="KernelOptions.dependent_launch must be True or False, got 'yes'"):
        KernelOptions(dependent_launch="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("merge", ["separate", "self"])
def test_gpu_decode_steps_give_the_same_bits_with_and_without_dependent_launch(merge):
    """Eight successive decode steps (append the step's key to the page index, select pages, attend),
    eagerly and replayed as one CUDA graph: with the kernels launched as programmatic dependent
    launches (where the GPU has them) every step's pages and output equal those without, bit for
    bit; each step reads what the step before it wrote, so a kernel that started too early shows up."""
    from sparse_attn.decode import PageIndex, PageSelection

    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, kv_heads, dim, page, context, steps = 2, 32, 8, 128, 64, 16384, 8
    k = torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    qs = [torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(steps)]
    first = context - steps
    selection = PageSelection(method="quest", budget=1024, sink=64, recent=64)

    def run(dependent: bool, graph: bool):
        options = KernelOptions(dependent_launch=dependent)
        index = PageIndex.build(k[:, :, :first], page, capacity=context)
        start = [t.clone() for t in (index.kmin, index.kmax, index.ksum)]
        workspace = DecodeWorkspace("cuda") if merge == "self" else None
        lens = [torch.full((batch,), first + i + 1, device="cuda", dtype=torch.int32) for i in range(steps)]

        def all_steps():  # from the index as built: every run (eager, capture, replays) starts alike
            for t, saved in zip((index.kmin, index.kmax, index.ksum), start):
                t.copy_(saved)
            index.lengths.fill_(first)
            index._length_bound = first
            results = []
            for i in range(steps):
                index.append(k[:, :, first + i:first + i + 1], kernel_options=options)
                pages, counts = selection(qs[i], index, kernel_options=options)
                out = decode_attention(qs[i], k, v, pages, counts, lens[i], page_size=page, kernel_options=options,
                                       workspace=workspace, check_values=False)
                results.append((pages, counts, out))
            return results

        results = all_steps()
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                results = all_steps()
            for _ in range(2):
                cuda_graph.replay()
        torch.cuda.synchronize()
        return [tuple(t.clone() for t in r) for r in results]

    want = run(False, graph=False)
    differ = []  # every case and step that differs, and in what, so one GPU run tells all
    for dependent, graph in ((False, False), (True, False), (False, True), (True, True)):
        got = run(dependent, graph)
        for step, ((p, c, o), (wp, wc, wo)) in enumerate(zip(got, want)):
            pairs = (("pages", p, wp), ("counts", c, wc), ("out", o, wo))
            what = [name for name, a, b in pairs if not torch.equal(a, b)]
            if what:
                differ.append(f"dependent={dependent} graph={graph} step {step}: {what}")
    assert not differ, differ
