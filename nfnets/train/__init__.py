"""Training library: data-parallel train step, checkpoints, eval and logs.

Entry point: `train_and_evaluate(config, workdir)` (`nfnets.train.loop`);
`abstract_train_state(config, num_classes)` gives the shapes of the state it
keeps (to restore its checkpoints elsewhere).
Pieces, one module each: `config` (the train/eval/checkpoint sections),
`mesh` (device mesh and sharding), `step` (train state and the pure train and
eval steps), `checkpoint` (Orbax + SIGTERM), `writers` (console, JSONL,
TensorBoard) and `loop` (the run itself).

The loop (and through it TensorFlow, for tf.data) is imported lazily, so the
step and mesh modules work where TensorFlow is not installed (e.g. a GPU
image used only for `experiments.benchmark`).
"""

_LOOP_NAMES = (
  'NonFiniteLossError',
  'TrainResult',
  'abstract_train_state',
  'train_and_evaluate',
)

__all__ = list(_LOOP_NAMES)


def __getattr__(name):
  if name in _LOOP_NAMES:
    from nfnets.train import loop  # noqa: PLC0415

    return getattr(loop, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
