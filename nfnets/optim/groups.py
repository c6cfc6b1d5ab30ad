"""Parameter groups: regexes over Haiku leaf names, and the masks they give.

A leaf's name is its Haiku path joined with '/', `module/param` (e.g.
`NFNet/~/nf_block_1/~/conv0/w`); a group is a list of Python regexes, each
`re.search`ed in that name. The defaults reproduce the groups of DeepMind's
reference (`SGD_AGC` in `deepmind-research/nfnets`).

The frozen group of fine-tuning (`frozen_mask`) is read from the module
names the ResNet-like families of `nfnets.models` share: their stems
(`STEM_MODULES`) and their numbered residual blocks (`BLOCK_MODULES`).
"""

import collections
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax

PyTree = Any
Patterns = str | Iterable[str] | None

# The classifier weight: a `linear*` module outside any squeeze-excite block.
# DeepMind's reference leaves only this tensor unclipped ('linear' in the
# module name and 'squeeze_excite' not in it; biases were put in the
# gains/biases group first, so the classifier bias is still clipped).
AGC_EXCLUDE = (r'^(?!.*squeeze_excite)(.*/)?linear(_\d+)?/w$',)

# The reference's no-weight-decay group: parameters named `b`, `scale` or
# `offset`, or whose name contains `gain` or `bias` (WS gains and biases,
# every `skip_gain`, Linear biases including the classifier's). Patterns are
# anchored on the parameter name, the part after the last '/'.
WD_EXCLUDE = (r'/(b|scale|offset)$', r'/[^/]*gain[^/]*$', r'/[^/]*bias[^/]*$')

# The stem modules of the ResNet-like families in `nfnets.models` (NFNet's
# four `stem_conv{i}`; the ResNets' and NF-RegNets' `initial_conv`, and BN
# ResNet v1's `initial_bn`), and the base names of their residual blocks,
# which Haiku numbers `name`, `name_1`, `name_2`, ... in network order
# (Fixup's are `res_block`, SkipInit's `nf_res_block`). EfficientNet's
# MBConv blocks are not among them: its seven stages change shape without
# a `conv_shortcut`, so the stage rule below cannot find them.
STEM_MODULES = r'stem_conv\d+|initial_conv|initial_bn'
# Stem parameters held by the network module itself: Fixup's scalar `bias1`
# after its stem conv (counted only on a network that has a stem module).
STEM_NET_PARAMS = r'bias1'
BLOCK_MODULES = r'nf_block|nf_res_block|res_block_v[12]|res_block'
_STEM_RE = re.compile(rf'^(?P<net>.*?)/~/(?:{STEM_MODULES})/[^/]+$')
_STEM_PARAM_RE = re.compile(rf'^(?P<net>.*)/(?:{STEM_NET_PARAMS})$')
_BLOCK_RE = re.compile(
  rf'^(?P<net>.*?)/~/(?P<base>{BLOCK_MODULES})'
  r'(?:_(?P<index>\d+))?/(?P<rest>.*)$'
)


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_name(path: Sequence[Any]) -> str:
  """Joins a pytree key path into a Haiku-style name `module/param`.

  Args:
    path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    The keys joined with '/', e.g. `'NFNet/~/linear/w'`.
  """
  return '/'.join(_key_name(k) for k in path)


def compile_patterns(patterns: Patterns) -> list[re.Pattern]:
  """Compiles a group's regexes, with a clear error for a bad one.

  Args:
    patterns: regexes, one regex, or None (no pattern).

  Returns:
    The compiled patterns.

  Raises:
    ValueError: a pattern is not a valid Python regex.
  """
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(
        f'Invalid parameter-group regex {p!r}: {e}. Patterns are Python '
        "regexes searched in 'module/param' names, e.g. r'/b$'."
      ) from e
  return compiled


def _matches(name: str, compiled: list[re.Pattern]) -> bool:
  return any(c.search(name) for c in compiled)


def select_leaves(params: PyTree, patterns: Patterns) -> list[str]:
  """Lists the leaves whose `module/param` name matches any of `patterns`.

  Args:
    params: a parameter tree, e.g. Haiku's `{module: {param: array}}`. Leaves
      may be arrays or `jax.ShapeDtypeStruct`s.
    patterns: regexes (or one regex), searched with `re.search`.

  Returns:
    The matching names, in tree order.
  """
  compiled = compile_patterns(patterns)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [
    leaf_name(path) for path, _ in leaves if _matches(leaf_name(path), compiled)
  ]


def _mask_excluding(params: PyTree, patterns: Patterns) -> PyTree:
  compiled = compile_patterns(patterns)
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not _matches(leaf_name(path), compiled), params
  )


def agc_mask(params: PyTree, exclude: Patterns = AGC_EXCLUDE) -> PyTree:
  """Boolean tree: True where AGC applies (leaves not matching `exclude`).

  Args:
    params: a parameter (or gradient) tree.
    exclude: regexes over `module/param` names; by default the classifier
      weight only, as in the reference.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return _mask_excluding(params, exclude)


def weight_decay_mask(params: PyTree, exclude: Patterns = WD_EXCLUDE) -> PyTree:
  """Boolean tree: True where weight decay applies.

  Args:
    params: a parameter (or gradient) tree.
    exclude: regexes over `module/param` names; by default gains, biases and
      skip gains, as in the reference.

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  return _mask_excluding(params, exclude)


def describe_param_groups(
  params: PyTree,
  agc_exclude: Patterns = AGC_EXCLUDE,
  wd_exclude: Patterns = WD_EXCLUDE,
) -> dict[str, list[str]]:
  """Names the leaves left out of AGC and of weight decay, for logging.

  Args:
    params: a parameter tree.
    agc_exclude: regexes of leaves that AGC skips.
    wd_exclude: regexes of leaves that weight decay skips.

  Returns:
    `{'no_agc': [...], 'no_weight_decay': [...], 'all': [...]}`.
  """
  return {
    'no_agc': select_leaves(params, agc_exclude),
    'no_weight_decay': select_leaves(params, wd_exclude),
    'all': select_leaves(params, ('',)),
  }


def _block_stages(names: Sequence[str]) -> dict[tuple, int]:
  """`(net, base, index) -> stage` (from 1) of every residual block.

  A stage starts at a network's first block and at every block with a
  `conv_shortcut`: every later stage of each family starts with a strided
  block, which has one, and no other block changes shape.
  """
  blocks = collections.defaultdict(set)  # (net, base) -> block indices.
  starts = collections.defaultdict(set)
  for name in names:
    m = _BLOCK_RE.match(name)
    if m:
      key, index = (m['net'], m['base']), int(m['index'] or 0)
      blocks[key].add(index)
      if m['rest'].startswith('~/conv_shortcut/'):
        starts[key].add(index)
  stages = {}
  for key, indices in blocks.items():
    firsts = sorted(starts[key] | {min(indices)})
    for index in indices:
      stages[(*key, index)] = sum(first <= index for first in firsts)
  return stages


def frozen_mask(params: PyTree, num_stages: int) -> PyTree:
  """Boolean tree: True on the stem and the first `num_stages` stages.

  The stem is every parameter of a `STEM_MODULES` module directly under a
  network, and that network's own `STEM_NET_PARAMS`; a stage is a run of
  `BLOCK_MODULES` blocks from one that starts a stage (the first, or one
  with a `conv_shortcut`) to the next. Anything else (the final conv, the
  classifier, modules of a head built around the network) is never frozen.

  Args:
    params: a parameter tree of a network of `nfnets.models` (alone or
      inside a larger model); leaves may be `jax.ShapeDtypeStruct`s.
    num_stages: stages to freeze with the stem, 1 to 4 (0: nothing).

  Returns:
    A tree of Python bools with the structure of `params`.

  Raises:
    ValueError: `num_stages` > 0 but the tree has no such blocks, or has
      fewer stages than `num_stages`.
  """
  names = select_leaves(params, ('',))
  stages = _block_stages(names)
  nets_with_stem = {m['net'] for m in map(_STEM_RE.match, names) if m}
  if num_stages > 0 and (not stages or max(stages.values()) < num_stages):
    found = max(stages.values(), default=0)
    raise ValueError(
      f'Cannot freeze {num_stages} stages: the parameters have {found} '
      f'stages of residual blocks (modules named {BLOCK_MODULES!r}: '
      'NFNets, NF-ResNets, NF-RegNets and the BN, SkipInit and Fixup '
      "ResNets; EfficientNet's blocks have no stages here). Use "
      'optimizer.freeze_stages <= that number.'
    )

  def frozen(name: str) -> bool:
    if num_stages <= 0:
      return False
    if _STEM_RE.match(name):
      return True
    m = _STEM_PARAM_RE.match(name)
    if m and m['net'] in nets_with_stem:
      return True
    m = _BLOCK_RE.match(name)
    if not m:
      return False
    return stages[(m['net'], m['base'], int(m['index'] or 0))] <= num_stages

  return jax.tree_util.tree_map_with_path(
    lambda path, _: frozen(leaf_name(path)), params
  )
