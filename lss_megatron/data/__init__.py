"""Data: datasets (the synthetic recall task, enwik8) and segment sharding with the global shift.

Import-light: numpy only (torch is imported when tensors are built, enwik8's module when asked).

* `build_dataset(name, seq_length=, vocab_size=, seed=, path=)` -> a `Dataset`;
* `check_data_config(name, path, vocab_size)` -> problems, for config validation;
* `segment_batch(dataset, split, step, indices, seq_rank, seq_size)` -> this rank's
  (tokens, labels, position_ids), reading only its segment;
* `replica_sample_indices` (which samples a data replica holds), `shard_segment` (cut whole rows);
* `segment_local_loss_floor(l, N, V)`: the best loss of segment-local attention on the synthetic
  task. See docs/data.md.
"""

from ..layout import LAYOUTS, segment_bounds, segment_chunks
from .base import SPLITS, DataError, Dataset
from .registry import DATASETS, build_dataset, check_data_config
from .sharding import replica_sample_indices, segment_batch, shard_segment
from .synthetic import (
    SyntheticRecall,
    full_attention_loss_floor,
    segment_local_loss_floor,
    synthetic_sequences,
)

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "SPLITS",
    "DataError",
    "Dataset",
    "SyntheticRecall",
    "build_dataset",
    "check_data_config",
    "full_attention_loss_floor",
    "replica_sample_indices",
    "segment_batch",
    "segment_bounds",
    "segment_chunks",
    "segment_local_loss_floor",
    "shard_segment",
    "synthetic_sequences",
]
