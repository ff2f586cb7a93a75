"""top_k_ties_to_earlier: the first k columns of a stable descending sort, for float32, float16 and
bfloat16 rows with many ties (zeros of both signs), infinities of both signs, and float64."""

import pytest
import torch

from sparse_attn.ranking import top_k_ties_to_earlier


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_equals_a_stable_descending_sort(dtype, k):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (3, 7, 40), generator=gen).to(dtype) / 2  # many exact ties
    scores[0, 0, :10] = -0.0
    scores[1, 2, 5] = float("inf")
    scores[1, 2, 6] = float("inf")
    scores[2, 3, :] = float("-inf")
    scores[2, 4, ::3] = float("-inf")
    values, order = top_k_ties_to_earlier(scores, k)
    want_values, want_order = torch.sort(scores.float() + 0.0, dim=-1, descending=True, stable=True)
    assert torch.equal(order, want_order[..., :k])
    assert torch.equal(values.float(), want_values[..., :k]) and values.dtype == dtype
