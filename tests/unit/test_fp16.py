"""--fp16 (issue #25 item 2): Megatron-LM's loss scaler rules and the loss-scaling options'
up-front checks. The runs (every mode against serial, overflow skipped alike, exact resume) are
tests/e2e/test_fp16.py."""

from __future__ import annotations

import pytest

from lss_megatron.config import ConfigError
from lss_megatron.train import config_from_argv
from lss_megatron.training.optim import LossScaler


def test_dynamic_scale_halves_after_the_hysteresis_and_doubles_after_a_clean_window():
    s = LossScaler(initial=1024.0, minimum=64.0, window=3, hysteresis=2)
    seen = []
    for overflow in (True, True, True, False, False, False, False, True, True, True, True, True):
        s.update(overflow)
        seen.append(s.scale)
    # 1st overflow: hysteresis 2 -> 1, kept; 2nd: halved; 3rd: halved again (hysteresis spent);
    # 3 clean steps: doubled (hysteresis restored to 2); then 5 overflows: 1 kept, then halved
    # down to the minimum 64 and no lower
    assert seen == [1024, 512, 256, 256, 256, 512, 512, 512, 256, 128, 64, 64]


def test_static_scale_never_changes_and_state_round_trips():
    s = LossScaler(static=128.0)
    for overflow in (True, True, False):
        s.update(overflow)
    assert s.scale == 128.0 and not s.dynamic
    d = LossScaler(initial=8.0, window=5, hysteresis=3)
    d.update(True)
    d.update(False)
    e = LossScaler(initial=1.0, window=5, hysteresis=3)
    e.load_state_dict(d.state_dict())
    assert e.state_dict() == d.state_dict() == {"scale": 8.0, "growth": 1, "hysteresis_left": 2}


MODEL = "--num-layers 1 --hidden-size 32 --num-heads 4 --seq-length 16 --out /tmp/x".split()


def test_megatron_names_and_defaults():
    cfg = config_from_argv([*MODEL, "--fp16"], 1)
    t = cfg.train
    assert t.dtype == "fp16" and t.loss_scale is None
    assert (t.initial_loss_scale, t.min_loss_scale, t.loss_scale_window, t.hysteresis) == (
        2.0**32,
        1.0,
        1000,
        2,
    )
    assert config_from_argv([*MODEL, "--fp16", "--loss-scale", "4096"], 1).train.loss_scale == 4096


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--loss-scale 1024", "--loss-scale: loss scaling applies to --dtype fp16 only, not fp32"),
        ("--bf16 --hysteresis 3", "--hysteresis: loss scaling applies to --dtype fp16 only"),
        ("--fp16 --loss-scale inf", "--loss-scale must be a finite number > 0, got inf"),
        ("--fp16 --initial-loss-scale 0", "--initial-loss-scale must be a finite number > 0"),
        ("--fp16 --min-loss-scale 8 --initial-loss-scale 4", "--min-loss-scale 8.0 exceeds"),
        ("--fp16 --loss-scale-window 0", "--loss-scale-window must be >= 1, got 0"),
    ],
)
def test_bad_loss_scaling_is_one_line_before_anything_runs(argv, message):
    with pytest.raises(ConfigError) as e:
        config_from_argv([*MODEL, *argv.split()], 1)
    assert message in str(e.value)
