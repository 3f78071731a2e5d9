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
