"""Training the canary model shipped in ``sparse_attn/eval/canary/``; run from the repository root:

    python -m tools.canary train --out DIR --minutes 9.9

trains it the way the shipped one was (9.9 minutes on an H100), the same as these three steps
(``--no-refine`` trains the base alone):

    python -m tools.canary train --no-refine --out base --minutes 5.5 --seq-len 8192
    python -m tools.canary refine --model base --out refined --minutes 2.2 --seed 2 --multi-value-share 0
    python -m tools.canary refine --model refined --out DIR --minutes 2.2 --seed 1

``--attention moba`` or ``--attention nsa`` trains with MoBA (patched in) or NSA (converted layers)
instead of dense attention, from scratch (``train``) or on from a dense canary (``refine --model
canary``); an NSA model is saved with its ``nsa.json`` and loads with its NSA attention in
``sparse-attn eval``; evaluate a MoBA-trained one with ``--methods moba``.

``--out`` is required. A directory that already holds a model (``config.json``, ``*.safetensors``) is
refused unless ``--force``; the shipped canary directory always is: train elsewhere, check the model
(``sparse-attn eval --model DIR``), then copy its files into ``src/sparse_attn/eval/canary/``.
"""

from .training import check_out_dir, refine, train, train_recipe

__all__ = ["check_out_dir", "refine", "train", "train_recipe"]
