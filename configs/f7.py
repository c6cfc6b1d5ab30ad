"""NFNet-F7 (or F7+ with `--config=configs/f7.py:plus`) on ImageNet.

The paper's recipe from `configs/common.py`; override any key on the
command line, e.g. `--config.optimizer.clipping=0.02`.
"""

from configs import common


def get_config(arg=None):
  """Returns the locked config; `arg` 'plus' selects the F7+ variant."""
  return common.nfnet_config(common.parse_variant('F7', arg))
