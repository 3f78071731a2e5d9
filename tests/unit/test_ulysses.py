"""`--mode ulysses` limits at the config level: heads and key/value heads must divide by N."""

from __future__ import annotations

import pytest

from lss_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig


def _run_config(n, heads, kv_heads, mode="ulysses"):
    return RunConfig(
        model=ModelConfig(hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv_heads),
        parallel=ParallelConfig(mode=mode, world_size=n, seq_parallel=n),
    ).validate()


@pytest.mark.parametrize(
    "n,heads,kv_heads,fragments",
    [
        (4, 6, 2, ["--num-heads 6 is not divisible by N = 4", "--num-kv-heads 2 is not divisible"]),
        (2, 6, 3, ["--num-kv-heads 3 is not divisible by N = 2"]),
        (4, 8, 2, ["--num-kv-heads 2 is not divisible by N = 4"]),
    ],
)
def test_ulysses_head_limits(n, heads, kv_heads, fragments):
    """Config-level: Ulysses names the offending head counts and points at LSS, which runs the
    same configuration."""
    with pytest.raises(ConfigError) as err:
        _run_config(n, heads, kv_heads)
    for frag in [*fragments, "--mode ulysses", "try --mode lss"]:
        assert frag in str(err.value), str(err.value)
    _run_config(n, heads, kv_heads, mode="lss")  # no head cap
    _run_config(n, 8 * n, 4 * n)  # divisible heads are fine
