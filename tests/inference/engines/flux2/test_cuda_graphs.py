"""A captured frame graph copies an input into its buffer only when the values may have changed: a
session's cached tensors are copied once, anything new or written since is copied again."""

from __future__ import annotations

import torch

from inference.engines.flux2.cuda_graphs import _holds


def test_the_same_cached_tensor_or_a_new_view_of_it_is_not_copied_again() -> None:
    cached = torch.randn(1, 512, 8)
    copied = (cached, cached._version)
    assert _holds(copied, cached)
    # A cut of the prompt embedding is a new view object every frame, of the same memory.
    cut = cached[:, :128]
    assert _holds((cut, cut._version), cached[:, :128])


def test_new_or_rewritten_values_are_copied() -> None:
    cached = torch.randn(1, 512, 8)
    copied = (cached, cached._version)
    assert not _holds(None, cached)  # nothing copied yet
    assert not _holds(copied, cached.clone())  # equal values elsewhere: a new tensor, copied
    assert not _holds(copied, cached[:, :128])  # another view of it: other values
    assert not _holds((cached[:, :128], cached._version), cached[:, 1:129])
    view = cached[:, :128]
    before = (view, view._version)
    cached.mul_(2)  # written in place: every view of it sees the new values
    assert not _holds(before, cached[:, :128])
    assert not _holds(copied, cached)
