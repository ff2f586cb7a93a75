"""Haystack text: the King James Bible (public domain), bundled gzipped (about 2 MB of text)."""

from __future__ import annotations

import functools
import gzip
from importlib import resources


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """The bundled haystack, paragraphs (chapters) separated by blank lines."""
    data = resources.files("sparse_attn.eval").joinpath("data/kjv_haystack.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")
