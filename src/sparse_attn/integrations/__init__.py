"""Integrations with other libraries (imported lazily: nothing here loads at `import sparse_attn`)."""
