"""``sparse_attn.integrations.hf.convert``: NSA and DSA layers put into a tiny random Llama, the same
model as the kinds' own ``convert_llama`` gives (options passed through), and clear errors for MoBA
(which ``patch`` runs), unknown kinds and configs of the wrong kind."""

import copy

import pytest
import torch

from sparse_attn.dsa import DSAConfig, DSALlamaAttention
from sparse_attn.dsa import convert_llama as dsa_convert_llama
from sparse_attn.integrations.hf import convert
from sparse_attn.nsa import NSAConfig, NSALlamaAttention
from sparse_attn.nsa import convert_llama as nsa_convert_llama
from utils import tiny_llama

NSA = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32, window_block=16)
DSA = DSAConfig(index_heads=2, index_head_dim=16, rope_dim=8, top_k=12)


@pytest.mark.parametrize("kind,config,layer_type,own", [
    ("nsa", NSA, NSALlamaAttention, nsa_convert_llama),
    ("dsa", DSA, DSALlamaAttention, dsa_convert_llama),
])
def test_convert_gives_the_kinds_own_conversion(kind, config, layer_type, own):
    model = tiny_llama(64)
    ids = torch.randint(1, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    got = convert(copy.deepcopy(model), kind, config, layers=[1], backend="reference")
    want = own(copy.deepcopy(model), config, layers=[1], backend="reference")
    assert isinstance(got.model.layers[1].self_attn, layer_type)
    assert not isinstance(got.model.layers[0].self_attn, layer_type)  # layers= passed through
    # The same new parameters (their initialisation is deterministic) and the same outputs.
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits)


def test_default_configs_and_errors():
    model = convert(tiny_llama(64, positions=2048), "nsa")  # NSAConfig() defaults
    assert isinstance(model.model.layers[0].self_attn, NSALlamaAttention)
    with pytest.raises(ValueError, match="patch\\(model, method='moba'"):
        convert(tiny_llama(64), "moba")
    with pytest.raises(ValueError, match="kind='mla'"):
        convert(tiny_llama(64), "mla")
    with pytest.raises(TypeError, match="NSAConfig"):
        convert(tiny_llama(64), "nsa", DSA)
