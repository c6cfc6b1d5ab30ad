"""Research tools around the models: signal propagation and config sweeps.

* `spp`: Signal Propagation Plots (the NF-ResNet paper's section 4): the
  channel statistics of any registry model at initialisation, block by
  block, written as CSV and plotted (`run_spp`, `SPP_MODELS`);
* `sweep`: a grid of config overrides, one training run per point, with the
  final metrics collected into a table and a plot (`Sweep`, `run_sweep`,
  `launch_lines`); its parts are `sweep_spec` (the sweep file's `Sweep`,
  its grid and point configs), `sweep_point` (one point's run, result and
  workdir checks), `sweep_tables` and `sweep_plot` (the results files) and
  `sweep_launch` (the command lines).

`python -m experiments.spp` and `python -m experiments.sweep` are their
command lines; see docs/research.md.
"""
