"""Test setup: kernels run in Triton's CPU interpreter unless a GPU is asked for explicitly."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poison_empty(monkeypatch):
    """Fresh ``torch.empty`` / ``torch.empty_like`` buffers start as NaN, so anything a kernel
    forgets to write shows up (use with ``pytestmark = pytest.mark.usefixtures("poison_empty")``)."""
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def nan_empty_like(t, *a, **kw):
        out = real_empty_like(t, *a, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty(*a, **kw):
        out = real_empty(*a, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    monkeypatch.setattr(torch, "empty", nan_empty)
