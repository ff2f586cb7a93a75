"""Estimation primitives: the heavy steps the sparsity methods share, one package each.

Each package's ``__init__`` holds the public wrapper, which runs the Triton kernels of its
``kernel`` module (imported only when they run, so importing ``sparse_attn`` never imports them) or
the plain-PyTorch reference of its ``naive`` module, as ``kernel_options.estimator_kernels`` says
(:func:`.dispatch.use_triton`):

* :mod:`.block_mass`: softmax mass per (query block, key block) (the oracle; XAttention's block score
  on its antidiagonally reshaped inputs).
* :mod:`.line_scores`: column and diagonal sums of the last rows' attention (vertical-slash's and
  FlexPrefill's line scores).
* :mod:`.top_p`: per row, the fewest largest entries reaching a share ``p`` of the row total.
* :mod:`.mean_pool`: mean of every block of tokens (the pooled Q/K summaries of pooled block scores).

Import the wrappers from their packages, e.g. ``from sparse_attn.methods.primitives.block_mass import
block_mass``.
"""
