"""Pretrained NFNet weights: safe loading, conversion, checking and use.

DeepMind's released NFNet-F0 ... F6 ImageNet weights are dill pickles named
`F{n}_haiku.npz`; this package reads them without running anything in them,
converts them once to safe formats, checks them against the model they are
for, and uses them:

* `safe_pickle`: the restricted unpickler for DeepMind's pickles
  (`read_dm_pickle`);
* `formats`: safetensors and pickle-free `.npz` files (`save_params`,
  `read_params`, `read_metadata`, `sniff_format`);
* `loading`: `load` (read + check every name and shape against a variant),
  `check_params`, `merge_pretrained` for fine-tuning, and `PRETRAINED`, the
  released files;
* `errors`: `WeightsError` and its subclasses;
* `timm_interop`: exchange with timm's PyTorch `dm_nfnet_f*` models;
* `inference`: classifying image files (`predict_files`), with the bundled
  ImageNet class names in `assets/`.

The names of `errors`, `formats`, `loading` and `safe_pickle` are
re-exported here, so `nfnets.pretrained.load(...)` is the usual entry point.
See docs/pretrained.md.
"""

from nfnets.pretrained.errors import (
  PretrainedMismatchError,
  UnsafePickleError,
  WeightsError,
)
from nfnets.pretrained.formats import (
  FORMAT_NAME,
  carried_metadata,
  flatten_params,
  read_metadata,
  read_params,
  save_params,
  sniff_format,
  unflatten_params,
)
from nfnets.pretrained.loading import (
  CLASSIFIER_MODULE,
  PRETRAINED,
  check_params,
  expected_shapes,
  find_mismatches,
  load,
  merge_pretrained,
)
from nfnets.pretrained.safe_pickle import Params, read_dm_pickle, validate_tree

__all__ = [
  'CLASSIFIER_MODULE',
  'FORMAT_NAME',
  'PRETRAINED',
  'Params',
  'PretrainedMismatchError',
  'UnsafePickleError',
  'WeightsError',
  'carried_metadata',
  'check_params',
  'expected_shapes',
  'find_mismatches',
  'flatten_params',
  'load',
  'merge_pretrained',
  'read_dm_pickle',
  'read_metadata',
  'read_params',
  'save_params',
  'sniff_format',
  'unflatten_params',
  'validate_tree',
]
