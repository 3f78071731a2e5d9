"""Comparison of serial, LSS and NVIDIA sequence parallelism: drivers, tables, figures.

* `analysis.compare`: ``python -m analysis.compare --preset NAME --out DIR`` runs a grid of
  trainer launches and writes ``DIR/summary.csv`` and ``DIR/figures``;
* `analysis.presets`: the grids (``smoke``, ``cpu-strong``, ``cpu-weak``, the paper's clusters);
* `analysis.tables`: the table's columns, ratios and efficiencies;
* `analysis.figures`: ``python -m analysis.figures DIR`` redraws the figures from the CSV;
* `analysis.costmodel`: the analytic cost model (optional for the above);
* `analysis.trainer_config`: the trainer's own configuration and validation, for all of these;
* `analysis.fitsearch`: the longest-sequence search (figures, cost model, `analysis.longest`);
* `analysis.longest`: the longest l within a per-rank budget, measured by running the trainer;
* `analysis.paper_figures`: the paper's figures, measured CPU runs beside the modelled paper scale;
* `analysis.calibrate`: this machine measured for the cost model's step time.

What each number means: docs/measurement.md.
"""
