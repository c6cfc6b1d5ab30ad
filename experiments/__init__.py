"""Command-line entry points, each run as `python -m experiments.<name>`.

Each module is an absl program: it parses flags and calls the library
(`nfnets`), where the work and its tests live, mostly through a single
function (`benchmark_input` also builds its small dataset and timing loops
itself). The programs:

* `train`: train and evaluate a config (`nfnets.train.train_and_evaluate`);
* `evaluate`: evaluate weights or a training run on a dataset split;
* `predict`: classify image files with a training run or weights file;
* `convert_weights`: convert weights files to safetensors, `.npz` or timm;
* `export`: write a model for serving (SavedModel, TFLite, StableHLO);
* `prepare_imagenet`: build the tfds ImageNet from the official tar files;
* `benchmark`: time training steps, the paper's speed protocol;
* `benchmark_input`: throughput of the input pipeline;
* `spp`: signal-propagation plots at initialisation;
* `sweep`: run a grid of config overrides and tabulate the results.

`common` is their shared plumbing: short messages for user errors (exit
status 2 for usage and config errors, 1 for runtime failures;
`NFNETS_TRACEBACK=1` shows the traceback), `--config` defaulting to a run's
saved config, and a quiet start (`quiet_start`: no TensorFlow or JAX
start-up notices, TensorFlow imported only by the commands that use it).

`scripts/` holds the rest: shell helpers (weight download, ImageNet
preparation, the GPU benchmark wrapper), the repository's structure check,
and standalone studies that compare with other code (timm parity and speed,
which need torch) or reproduce one result (the AGC stability study).
"""
