"""``python -m sparse_attn`` runs the ``sparse-attn`` command line."""

from .cli import main

main()
