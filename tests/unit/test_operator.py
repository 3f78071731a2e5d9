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
    layer's gather (on CUDA a fresh ``torch.tensor(..., device=cuda)`` would block the host every
    layer); `KVTransport` puts every gathered chunk (rank order) at its global place with it, and
    its backward puts the gradients back into rank order (the exact inverse)."""
    import torch

    from lss_megatron.layout import zigzag_gather_order
    from lss_megatron.lss import kv_gather, operator

    assert operator.zigzag_permutation is kv_gather.zigzag_permutation  # still importable there
    kv_gather.zigzag_permutation.cache_clear()
    n, c = 2, 4
    transport = kv_gather.KVTransport(None, zigzag_n=n)
    buf = torch.randn(2 * n * c, 1, 4, 8)  # rank order: rank s holds chunks s and 2N-1-s
    outs = [transport._to_global(buf) for _ in range(3)]  # three layers' gathers
    info = kv_gather.zigzag_permutation.cache_info()
    assert (info.misses, info.hits) == (1, 2), info
    perm = kv_gather.zigzag_permutation(n, torch.device("cpu"))
    assert perm is kv_gather.zigzag_permutation(n, torch.device("cpu"))
    assert perm.tolist() == zigzag_gather_order(n)
    assert all(torch.equal(o, outs[0]) for o in outs)
    for j, slot in enumerate(zigzag_gather_order(n)):  # chunk j of the sequence, from its slot
        assert torch.equal(outs[0][j * c : (j + 1) * c], buf[slot * c : (slot + 1) * c])
    assert torch.equal(transport._to_ranks(outs[0]), buf)
