"""The LSS method, one idea per file: the attention kernel, the fused K/V gather, the distributed
operator, the Megatron core-attention adapter, sequence-distributed positions and double
gradient averaging."""
