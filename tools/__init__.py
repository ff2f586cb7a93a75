"""Maintainer tools, run from the root of a source checkout (``python -m tools.<name>``); not part of
the installed ``sparse_attn`` package."""
