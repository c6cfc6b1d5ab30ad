"""A run config as JSON and back: tuples and typed placeholders kept.

`config.json` and the segment records hold a config as plain JSON, which
turns tuples into lists and typed `None` placeholders into bare nulls.
`config_record` stores that type information beside the JSON, and
`config_from_record` rebuilds the ConfigDict training used from both.
`flag_text` writes a value as the text of a `--config.<key>=` flag.
"""

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict
from ml_collections.config_flags import config_path


def _type_info(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """`{dotted key: type}` for the leaves JSON does not describe alone.

  Tuples become JSON lists, and a typed placeholder (a `FieldReference`,
  e.g. `config_dict.placeholder(int)`) becomes a bare value or null, so
  both are recorded: 'tuple', or 'ref:<type name>' for a reference.
  """
  types = {}
  for key in config.keys():
    path = prefix + key
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      types.update(_type_info(value, path + '.'))
      continue
    # `_fields` is the only way to tell a placeholder from a plain value.
    field = config._fields[key]  # noqa: SLF001
    if isinstance(field, config_dict.FieldReference):
      types[path] = 'ref:' + field.get_type().__name__
    elif isinstance(value, tuple):
      types[path] = 'tuple'
  return types


_REF_TYPES = {t.__name__: t for t in (int, float, str, bool, tuple, list)}


def as_tuple(value):
  """`value` with every list, however nested, as a tuple."""
  if isinstance(value, list):
    return tuple(as_tuple(v) for v in value)
  return value


def _typed(plain: Mapping, types: Mapping, prefix: str = ''):
  """The ConfigDict of JSON `plain`, with tuples and placeholders typed."""
  config = ml_collections.ConfigDict()
  for key, value in plain.items():
    path = prefix + key
    kind = types.get(path)
    if isinstance(value, Mapping):
      value = _typed(value, types, path + '.')
    elif kind == 'tuple' or (kind == 'ref:tuple' and value is not None):
      value = as_tuple(value)
    elif kind is None and isinstance(value, list):
      value = as_tuple(value)  # Configs hold tuples (hashable for jit).
    if kind and kind.startswith('ref:') and kind[4:] in _REF_TYPES:
      value = config_dict.FieldReference(value, field_type=_REF_TYPES[kind[4:]])
    config[key] = value
  return config


def config_record(config: ml_collections.ConfigDict) -> dict:
  """`{'config': JSON-able dict, 'types': ...}`: what `config_from_record`
  turns back into `config`.

  Args:
    config: a run's config.

  Returns:
    The plain config (as written to config.json) and its type information.
  """
  plain = json.loads(config.to_json_best_effort(sort_keys=True))
  return {'config': plain, 'types': _type_info(config)}


def config_from_record(record: Mapping) -> ml_collections.ConfigDict:
  """The locked ConfigDict of a `config_record` (or a plain config dict).

  Args:
    record: `{'config': ..., 'types': ...}`, or a plain config dict (as in
      config.json), whose lists are then read as tuples.

  Returns:
    A locked ConfigDict.
  """
  if 'config' in record and 'types' in record:
    plain, types = record['config'], record['types']
  else:
    plain, types = record, {}
  config = _typed(plain, types)
  config.lock()
  return config


def _literal(value: Any) -> str:
  """A Python literal of `value`, its strings in double quotes.

  Double quotes leave the single quotes to the shell: the printed word is
  '--config.k=("linear", "bias")', not a tangle of '"'"'.
  """
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, str):
    return json.dumps(value)  # Its escapes are Python's too.
  if isinstance(value, tuple):
    items = [_literal(v) for v in value]
    return f'({", ".join(items)}{"," if len(items) == 1 else ""})'
  if isinstance(value, list):
    return f'[{", ".join(_literal(v) for v in value)}]'
  if isinstance(value, dict):
    items = (f'{_literal(k)}: {_literal(v)}' for k, v in value.items())
    return '{' + ', '.join(items) + '}'
  return repr(value)


def flag_text(base: ml_collections.ConfigDict, key: str, value: Any) -> str:
  """The text of `--config.<key>=` that config_flags parses back to `value`.

  Args:
    base: the config file's config (config_flags reads the field's type
      there, not in the point's config).
    key: the dotted key.
    value: the value in the point's config.
  """
  if config_path.get_type(key, base) is str and isinstance(value, str):
    return value  # A str field is parsed as the text itself.
  return _literal(value)
