"""The shared plotting helpers of every figure of the project (analysis/figures.py,
analysis/paper_figures.py, analysis/longest.py): one fixed colour per mode, the hatches, the
matplotlib setup, the title with preset and machine, axis scaling and byte units, saving.

Colours: `MODE_COLOURS` is the one table; a figure never picks a mode's colour elsewhere. A
variant (``lss-zigzag``, ``ulysses-zero1``, ...) or a series label with its setting
(``lss [dense, selective]``) takes its mode's colour (`mode_of`); where several series of one
mode share a figure, `shades` gives them lighter and darker tones of that colour, so the hue
still names the mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .costmodel.counts import MODES as COSTED_MODES
from .costmodel.counts import mode_of as mode_declaration

MODE_COLOURS = {m: mode_declaration(m).colour for m in COSTED_MODES}
"""One colour per mode, in every figure of the project: each mode's own (`Mode.colour`, declared
in its mode module; the cost model's peers, ring, in `costmodel.peers`)."""
OTHER_COLOUR = "black"
"""A label that names no mode of `MODE_COLOURS`."""
HATCHES = ("", "//", "\\\\", "xx", "..", "oo", "--", "++", "||", "**", "/o", "\\|")
"""Bar hatches, in order: the first (none) for the plain configuration (flash, no recompute,
fp32, no option), the others for each further kernel / recompute / variant combination."""
LOG_SPAN = 30.0
"""An axis turns logarithmic when its largest value exceeds its smallest by more than this."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mode_of(label: str) -> str:
    """The mode a series label belongs to: ``lss-zigzag`` -> ``lss``, ``nvidia-sp [dense]`` ->
    ``nvidia-sp``, ``ulysses-zero1`` -> ``ulysses``; the label itself when it names no mode."""
    base = str(label).split(" [")[0]
    if base in MODE_COLOURS:
        return base
    for mode in sorted(MODE_COLOURS, key=len, reverse=True):
        if base.startswith(mode + "-"):
            return mode
    return base


def mode_colour(label: str) -> str:
    """The colour of the mode `label` belongs to (`mode_of`)."""
    return MODE_COLOURS.get(mode_of(label), OTHER_COLOUR)


def shade(colour: str, k: int) -> tuple[float, float, float]:
    """The k-th tone of `colour`: 0 itself, then alternately darker and lighter, further each
    time (k = 1 darker by 35%, 2 lighter by 40%, 3 darker by 55%, ...)."""
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(colour))
    if k == 0:
        return tuple(rgb)
    step = (k + 1) // 2
    if k % 2:  # darker: towards black
        out = rgb * max(1 - 0.35 - 0.2 * (step - 1), 0.15)
    else:  # lighter: towards white
        out = rgb + (1 - rgb) * min(0.4 + 0.15 * (step - 1), 0.8)
    return tuple(float(x) for x in out)


def shades(labels) -> dict[str, object]:
    """A colour per series label: each label its mode's colour (`mode_colour`); where several
    labels share a mode, the plain one (the mode itself, or the first in sorted order) keeps the
    colour and the others get its tones (`shade`)."""
    labels = sorted(set(labels), key=lambda x: (mode_of(x), x != mode_of(x), x))
    seen: dict[str, int] = {}
    out: dict[str, object] = {}
    for label in labels:
        mode = mode_of(label)
        k = seen.get(mode, 0)
        seen[mode] = k + 1
        base = mode_colour(label)
        out[label] = base if k == 0 else shade(base, k)
    return out


def scale(ax, axis: str, values, base: int = 10) -> None:
    """Logarithmic only when the positive values span more than `LOG_SPAN`; integer ticks on a
    rank axis (``base=2`` on x)."""
    from matplotlib.ticker import NullLocator, ScalarFormatter

    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x) and x > 0], dtype=float)
    if v.size and v.max() / v.min() > LOG_SPAN:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
    if axis == "x" and base == 2 and v.size:  # ranks: ticks at the measured P
        ax.set_xticks(sorted(set(v.astype(int))))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())


def bytes_unit(values) -> tuple[float, str]:
    """(divisor, unit) so that the largest value reads between 1 and 1024."""
    arr = np.asarray(values, dtype=float)
    top = np.nanmax(arr) if arr.size and np.isfinite(arr).any() else 0.0
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if top >= div:
            return float(div), unit
    return 1.0, "B"


def context(df: pd.DataFrame) -> str:
    """ "preset X · machine Y" of the ok runs (from the ``preset`` and ``machine`` columns;
    `tables.read_summary` fills a missing preset with the run folder's name)."""
    ok = df[df["status"] == "ok"] if "status" in df else df

    def names(column: str) -> str:
        if column not in ok:
            return ""
        values = sorted({str(x) for x in ok[column].dropna() if str(x)})
        return ", ".join(values)

    # tables.read_summary names a run without a preset by its folder; a frame made in code
    # without either says so plainly (never "preset preset not recorded")
    preset = names("preset") or "(unnamed)"
    return f"preset {preset} · {names('machine') or 'machine not recorded'}"


def title(fig, text: str, ctx: str) -> None:
    """The figure's title, with the preset and machine line (`context`) under it."""
    fig.suptitle(f"{text}\n{ctx}" if ctx else text, fontsize=10)


def empty(ax, why: str) -> None:
    """An axes that says why it has nothing to show."""
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def save(fig, stem: Path) -> list[Path]:
    """Write `fig` as ``stem.png`` and ``stem.pdf`` and close it; returns the paths."""
    stem = Path(stem)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return paths
