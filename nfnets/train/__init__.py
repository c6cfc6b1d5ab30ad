"""Training library: data-parallel train step, checkpoints, eval and logs.

Entry point: `train_and_evaluate(config, workdir)` (`nfnets.train.loop`).
Pieces, one module each: `config` (the train/eval/checkpoint sections),
`mesh` (device mesh and sharding), `step` (train state and the pure train and
eval steps), `checkpoint` (Orbax + SIGTERM), `writers` (console, JSONL,
TensorBoard) and `loop` (the run itself).
"""

from nfnets.train.loop import (
  NonFiniteLossError,
  TrainResult,
  train_and_evaluate,
)

__all__ = ['NonFiniteLossError', 'TrainResult', 'train_and_evaluate']
