"""What keeps the wheel working (tests/e2e/test_packaging.py builds it): ``analysis/`` and
``baselines/`` install as ``lss_megatron.analysis`` / ``lss_megatron.baselines``, so no module
may import them by their repository names (inside them: relative imports), and the presets are
found in a checkout as in an installation."""

from __future__ import annotations

import ast

from lss_megatron.resources import compare_presets_dir, presets_dir, source_root
from tests.support import ROOT

GENERIC = ("analysis", "baselines")


def _absolute_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def test_no_import_by_a_generic_top_level_name():
    bad = []
    for top in ("lss_megatron", *GENERIC):
        for path in (ROOT / top).rglob("*.py"):
            if "fixtures" in path.parts:  # test data helpers, not installed
                continue
            bad += [
                f"{path.relative_to(ROOT)}:{line}: {mod}"
                for line, mod in _absolute_imports(path)
                if mod.split(".")[0] in GENERIC
            ]
    assert not bad, "\n".join(bad)


def test_presets_found_in_the_checkout():
    assert source_root() == ROOT
    assert presets_dir() == ROOT / "launch" / "presets"
    assert (presets_dir() / "paper-enwik8-144gpu.yaml").is_file()
    assert compare_presets_dir() == ROOT / "launch" / "presets" / "compare"
    assert (compare_presets_dir() / "smoke.yaml").is_file()
