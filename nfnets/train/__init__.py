"""Training library: data-parallel training, checkpoints, evaluation, logs.

Entry point: `train_and_evaluate(config, workdir)`, which returns a
`TrainResult` and raises `NonFiniteLossError` when the loss diverges;
`abstract_train_state(config, num_classes)` gives the shapes of the state a
run keeps (to restore its checkpoints elsewhere). One module per concern:

* `loop`: the run itself (`train_and_evaluate`): builds the run, steps,
  logs, evaluates and checkpoints;
* `init_state`: the state a run starts from (fresh, `init_from` weights or
  run, or the newest checkpoint) and `abstract_train_state`;
* `step`: the pure train and eval steps;
* `gradients`: a step's forward/backward pass, whole or in micro-batches
  (gradient accumulation);
* `sam`: SAM's ascent step, on which rows and synced or per device;
* `state`: the train state (`TrainState`, `make_train_state`);
* `losses`: targets with label smoothing, the loss and top-k accuracy;
* `evaluation`: the eval loop over a dataset split, used by the loop and by
  `evaluate_from` (weights files and training workdirs,
  `experiments/evaluate.py`);
* `checkpoint`: Orbax checkpoints (any device count, damaged ones
  diagnosed);
* `preemption`: SIGTERM and Ctrl-C as a flag the loop polls between steps;
* `provenance`: the run's configs, one record per segment
  (`load_run_config`), checked on resume;
* `resume_rules`: which config changes a resume may make
  (`config_differences`, `check_resume`);
* `config_json`: a config as JSON and back, with its tuples and typed
  placeholders;
* `run_weights`: a run as a source of weights where its dataset is not
  (`dataset.json`, `run_params`: its newest checkpoint's params);
* `writers`: console progress, `metrics.jsonl` and TensorBoard;
* `event_file`: TensorBoard event files written without TensorFlow;
* `mesh`: the `('data',)` device mesh and sharding helpers;
* `config`: the `train`, `eval` and `checkpoint` config sections;
* `runtime`: process setup before JAX starts (multi-host, compilation
  cache) and the host malloc settings for XLA:CPU.

The names above are imported lazily: `loop` and `evaluation` import the
input pipelines and Orbax, which the step, mesh and runtime modules do not
need. Nothing here needs TensorFlow: without it the data loader is the
TensorFlow-free one (`config.data.loader`).
"""

import importlib

_LAZY_NAMES = {
  'NonFiniteLossError': 'loop',
  'TrainResult': 'loop',
  'train_and_evaluate': 'loop',
  'abstract_train_state': 'init_state',
}

__all__ = list(_LAZY_NAMES)


def __getattr__(name):
  if name in _LAZY_NAMES:
    module = importlib.import_module(f'{__name__}.{_LAZY_NAMES[name]}')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
