"""`lss_attention` argument checks, in one process (no process group is needed to reject them)."""

from __future__ import annotations

import pytest


def test_lss_attention_rejects_bad_shapes():
    import torch

    from lss_megatron import lss_attention

    q = torch.zeros(4, 1, 4, 8)
    with pytest.raises(ValueError, match="not divisible"):
        lss_attention(q, torch.zeros(4, 1, 3, 8), torch.zeros(4, 1, 3, 8), group=object())
    with pytest.raises(ValueError, match="must both be"):
        lss_attention(q, torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 2, 4), group=object())
    with pytest.raises(ValueError, match="sbhd"):
        lss_attention(q[0], q, q, group=object())


def test_zigzag_permutation_is_built_once_per_device():
    """The zigzag gather order is an index tensor built once per (N, device) and reused by every
    layer's forward (on CUDA a fresh ``torch.tensor(..., device=cuda)`` would block the host every
    layer); the reused tensor still puts every gathered chunk where the per-forward one did."""
    import torch

    from lss_megatron.layout import zigzag_gather_order
    from lss_megatron.lss import operator

    operator.zigzag_permutation.cache_clear()
    n, c = 2, 4
    q = torch.randn(2 * c, 1, 2, 8)
    kv = [torch.randn(2 * n * c, 1, 2, 8) for _ in range(2)]
    outs = [
        operator._partial(q, *kv, 1, n, "zigzag", True, 0.35, "math") for _ in range(3)
    ]  # three layers' forwards
    info = operator.zigzag_permutation.cache_info()
    assert (info.misses, info.hits) == (1, 2), info
    perm = operator.zigzag_permutation(n, torch.device("cpu"))
    assert perm is operator.zigzag_permutation(n, torch.device("cpu"))
    assert perm.tolist() == zigzag_gather_order(n)
    assert all(torch.equal(o, outs[0]) for o in outs)
