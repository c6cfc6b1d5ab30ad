"""Research tools around the models: signal propagation and config sweeps.

* `spp`: Signal Propagation Plots (the NF-ResNet paper's section 4): the
  channel statistics of any registry model at initialisation, block by
  block, written as CSV and plotted (`run_spp`, `SPP_MODELS`);
* `sweep`: a grid of config overrides, one training run per point, with the
  final metrics collected into a table and a plot (`Sweep`, `run_sweep`,
  `launch_lines`).

`python -m experiments.spp` and `python -m experiments.sweep` are their
command lines; see docs/research.md.
"""
