"""``convert(model, kind, config)``: give a transformers Llama-family model natively trainable sparse
attention layers, which carry parameters of their own and so replace its attention modules (where
:func:`~.patching.patch` swaps the attention function and adds no parameter).

* ``"nsa"``: Native Sparse Attention, :func:`sparse_attn.nsa.convert_llama` (config: an
  :class:`~sparse_attn.nsa.NSAConfig`, default ``NSAConfig()``).
* ``"dsa"``: DeepSeek Sparse Attention's lightning indexer and token top-k,
  :func:`sparse_attn.dsa.convert_llama` (config: a :class:`~sparse_attn.dsa.DSAConfig`, default
  ``DSAConfig()``).

MoBA has no parameters of its own: it runs through ``patch(model, method="moba", ...)``.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

KINDS = ("nsa", "dsa")


def convert(model: nn.Module, kind: str, config: Optional[Any] = None, **options) -> nn.Module:
    """Replace the attention of ``model``'s decoder layers by ``kind``'s trainable sparse attention, in
    place; returns ``model``. ``config``: the kind's config object (None: its defaults); ``options``
    go to the kind's ``convert_llama`` (``layers=``, ``backend=``, and for ``"nsa"`` ``kernel_options=``
    and ``gate_bias=``, for ``"dsa"`` ``stage=``). ValueError naming ``kind`` for an unknown kind
    (and for ``"moba"``, which ``patch`` runs); TypeError naming ``config`` for a config of the
    wrong kind."""
    if kind == "moba":
        raise ValueError("convert: kind='moba' has no parameters to add: run it with "
                         "patch(model, method='moba', ...)")
    if kind == "nsa":
        from ...nsa import NSAConfig, convert_llama

        expected = NSAConfig
    elif kind == "dsa":
        from ...dsa import DSAConfig, convert_llama

        expected = DSAConfig
    else:
        raise ValueError(f"convert: kind={kind!r} is not one of {list(KINDS)}")
    if config is None:
        config = expected()
    elif not isinstance(config, expected):
        raise TypeError(f"convert: config for kind={kind!r} must be a {expected.__name__}, got "
                        f"{type(config).__name__}")
    return convert_llama(model, config, **options)
