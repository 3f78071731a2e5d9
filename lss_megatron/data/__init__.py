"""Data: the built-in synthetic task and segment sharding (global label shift, then cut)."""

from .sharding import replica_sample_indices, shard_segment
from .synthetic import synthetic_sequences

__all__ = ["replica_sample_indices", "shard_segment", "synthetic_sequences"]
