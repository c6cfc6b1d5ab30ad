"""Performance measurement: the paper's speed and memory protocol, and where
compile time goes.

* `benchmark`: `run_benchmark`, the train step (and forward pass) of any
  registry model timed as in the NFNet paper's Table 3;
* `workload`: what is benchmarked: model configs, the recipe's optimizer,
  synthetic data on the device, the jitted train step and forward pass;
* `measure`: timing of calls and the peak-memory sources (device allocator,
  XLA's accounting, process RSS);
* `report`: the `BenchmarkResult` record, its software environment, and
  the Markdown table;
* `compile_trace`: XLA's compile events summed by name;
* `kernel_census`: fusions and distinct kernels of a compiled program;
* `plot_stamp`: the mark on the plots `--table=paper` writes, so that only
  they are replaced.

`python -m experiments.benchmark` is the command line; see
docs/performance.md.
"""
