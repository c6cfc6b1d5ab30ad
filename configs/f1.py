"""NFNet-F1 (or F1+ with `--config=configs/f1.py:plus`) on ImageNet.

The paper's recipe from `configs/common.py`; override any key on the
command line, e.g. `--config.optimizer.clipping=0.02`.
"""

from configs import common


def get_config(arg=None):
  """Returns the locked config; `arg` 'plus' selects the F1+ variant."""
  return common.nfnet_config(common.parse_variant('F1', arg))
