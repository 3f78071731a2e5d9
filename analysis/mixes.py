"""Document-length mixes: deterministic packed corpora for the packed-document comparisons.

`write_mix` writes ``FOLDER/NAME.jsonl`` (one JSON document per line, ``{"text": ...}``, each of
``n`` lowercase ASCII letters, ``n`` uniform in ``[lo, hi]`` from ``numpy.random.default_rng
(seed)``) until it holds `tokens` tokens, and converts it as Megatron-LM's preprocess_data would
(``make_indexed --json-keys text --append-eod``): byte tokens plus the end-of-document id 256, so
a document of ``n`` bytes is ``n + 1`` tokens. The same arguments always give the same files.

Used by the ``cpu-packed`` compare preset (`analysis.presets.Preset.documents`, written by
`analysis.compare` into ``OUT/data``) and by `analysis.packed`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_mix(
    folder: Path, name: str, lo: int, hi: int, tokens: int = 200_000, seed: int = 0
) -> tuple[str, list[int]]:
    """Write the mix (module doc); returns (the indexed dataset's prefix, the document lengths in
    tokens, EOD included)."""
    from lss_megatron.data.make_indexed import make_indexed

    if not 1 <= lo <= hi:
        raise ValueError(f"document mix {name!r}: lengths [{lo}, {hi}] need 1 <= lo <= hi")
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src, lengths, total = folder / f"{name}.jsonl", [], 0
    with src.open("w") as f:
        while total < tokens:
            n = int(rng.integers(lo, hi + 1))
            text = "".join(chr(c) for c in rng.integers(97, 123, n))
            f.write(json.dumps({"text": text}) + "\n")
            lengths.append(n + 1)
            total += n + 1
    make_indexed(src, folder / name, json_key="text", append_eod=True)
    return str(folder / name), lengths
