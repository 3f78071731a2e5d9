"""A rank-aware logger: every record carries the rank; by default only rank 0 logs below WARNING."""

from __future__ import annotations

import logging
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the `lss_megatron` logger hierarchy for this process (call once per process)."""
    root = logging.getLogger("lss_megatron")
    root.setLevel(level)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank, all_ranks))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("lss_megatron") else f"lss_megatron.{name}")
