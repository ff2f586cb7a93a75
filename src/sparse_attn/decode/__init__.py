"""Decode-time sparse attention: a page index kept with the KV cache, per-step page selection, and
attention over the selected pages."""

from .attention import decode_attention
from .bounds import BOUNDS, quantize_bounds
from .page_index import PAGE_SIZES, PageIndex
from .workspace import DecodeWorkspace
from .select import MAX_QUERY_ROWS, SELECT_METHODS, PageSelection, page_mass, select_pages, select_pages_by_score

__all__ = ["decode_attention", "DecodeWorkspace", "PageIndex", "PAGE_SIZES", "BOUNDS", "quantize_bounds",
           "PageSelection", "select_pages", "select_pages_by_score", "page_mass", "SELECT_METHODS", "MAX_QUERY_ROWS"]
