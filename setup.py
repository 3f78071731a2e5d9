"""Packages of the wheel (the metadata is in pyproject.toml).

The repository keeps the design's top-level folders ``analysis/`` and ``baselines/``, but nothing
installs under such generic names: they become ``lss_megatron.analysis`` and
``lss_megatron.baselines`` (``package_dir``), and ``launch/presets/*.yaml`` (the trainer's
presets) and ``launch/presets/compare/*.yaml`` (the comparison grids) ship as the package data
``lss_megatron/presets`` (found through `lss_megatron.resources.presets_dir` and
`compare_presets_dir`). Every folder
with an ``__init__.py`` under the three is included, so a new subpackage needs no edit here.
"""

from setuptools import find_packages, setup

MAPPED = {"lss_megatron.analysis": "analysis", "lss_megatron.baselines": "baselines"}

packages = find_packages(include=["lss_megatron", "lss_megatron.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
packages.append("lss_megatron.presets")  # data only: launch/presets

setup(
    packages=packages,
    package_dir={**MAPPED, "lss_megatron.presets": "launch/presets"},
    package_data={
        "lss_megatron.presets": ["*.yaml", "compare/*.yaml"],
        "lss_megatron.analysis": ["data/gpu/*.json"],
    },
)
