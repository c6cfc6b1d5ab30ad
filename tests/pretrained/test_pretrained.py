"""Tests for nfnets.pretrained: safe unpickling, formats, checks, merging.

The DeepMind-format pickles are written here by hand, the way dill writes
them (`dill._dill._create_array` around numpy's `_reconstruct`, `numpy.dtype`
records, under both `numpy.core` and `numpy._core` names), with a small
pickler that emits arbitrary global references without importing them, so
neither dill nor numpy.core is needed.
"""

import io
import os
import pickle

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets import pretrained
from nfnets.models import nfnet
from nfnets.pretrained import timm_interop

# A tiny NFNet: the real stem and head, one block per stage, 1/8 width.
TINY = dict(width=0.125, depth=(1, 1, 1, 1))
NUM_CLASSES = 10


class _Global:
  """Pickled as a reference to the global `module.name` (never imported)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError('placeholder only')


class _Reduce:
  """Pickled as `func(*args)`, followed by BUILD with `state` if given."""

  def __init__(self, func, args, state=None):
    self.func, self.args, self.state = func, args, state

  def __reduce__(self):
    if self.state is None:
      return self.func, self.args
    return self.func, self.args, self.state


class _HandPickler(pickle._Pickler):
  """Pure-Python pickler that writes `_Global`s as GLOBAL/STACK_GLOBAL."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global_ref(self, obj):
    if self.proto >= 4:
      self.save(obj.module)
      self.save(obj.name)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())

  dispatch[_Global] = _save_global_ref


def _dtype_record(dtype):
  _, args, state = np.dtype(dtype).__reduce__()
  return _Reduce(_Global('numpy', 'dtype'), args, state)


def _array_record(array, numpy_core, use_dill):
  """numpy's ndarray reduction, optionally wrapped the way dill wraps it."""
  array = np.asarray(array)
  reconstruct = _Global(f'{numpy_core}.multiarray', '_reconstruct')
  args = (_Global('numpy', 'ndarray'), (0,), b'b')
  state = (1, array.shape, _dtype_record(array.dtype), False, array.tobytes())
  if use_dill:
    create = _Global('dill._dill', '_create_array')
    return _Reduce(create, (reconstruct, args, state, None))
  return _Reduce(reconstruct, args, state)


def write_dm_pickle(params, path, *, numpy_core='numpy.core', use_dill=True,
                    protocol=4, extra=None):  # fmt: skip
  """Writes params as DeepMind's released files are written (dill pickle)."""
  tree = {
    module: {n: _array_record(x, numpy_core, use_dill) for n, x in v.items()}
    for module, v in params.items()
  }
  tree.update(extra or {})
  with open(path, 'wb') as f:
    _HandPickler(f, protocol=protocol).dump(tree)


@pytest.fixture(scope='module')
def tiny_params():
  """Random params of the tiny NFNet (shapes from the model itself)."""

  def forward(x):
    return nfnet.NFNet(NUM_CLASSES, 'F0', **TINY)(x, is_training=False)

  shapes = jax.eval_shape(
    hk.transform(forward).init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
  )
  rng = np.random.RandomState(0)
  return {
    m: {n: np.asarray(0.5 * rng.randn(*s.shape), np.float32)
        for n, s in leaves.items()}
    for m, leaves in shapes.items()
  }  # fmt: skip


def _assert_same_params(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module]), module
    for name in a[module]:
      x, y = np.asarray(a[module][name]), np.asarray(b[module][name])
      assert x.dtype == y.dtype and x.shape == y.shape, (module, name)
      np.testing.assert_array_equal(x, y)


def test_dill_pickle_loads_with_identical_logits(tiny_params, tmp_path):
  path = tmp_path / 'F0_haiku.npz'
  write_dm_pickle(tiny_params, path)
  loaded = pretrained.load(path, 'F0', **TINY)
  _assert_same_params(tiny_params, loaded)

  def forward(x):
    net = nfnet.NFNet(NUM_CLASSES, 'F0', **TINY)
    return net(x, is_training=False)['logits']

  apply = jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)
  x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  want, got = apply(tiny_params, x), apply(loaded, x)
  assert np.all(np.isfinite(want)) and np.std(want) > 0
  np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


@pytest.mark.parametrize(
  'numpy_core, use_dill, protocol',
  [
    ('numpy.core', True, 2),
    ('numpy._core', True, 4),
    ('numpy.core', False, 3),
    ('numpy._core', False, 5),
  ],
)
def test_pickle_variants_round_trip(tiny_params, tmp_path, numpy_core,
                                    use_dill, protocol):  # fmt: skip
  path = tmp_path / 'w.npz'
  write_dm_pickle(tiny_params, path, numpy_core=numpy_core, use_dill=use_dill,
                  protocol=protocol)  # fmt: skip
  _assert_same_params(tiny_params, pretrained.read_dm_pickle(path))


def test_old_haiku_flat_mappings_load_as_dicts(tiny_params, tmp_path):
  # Haiku of 2020-21 returned params as FlatMapping, pickled as
  # `haiku._src.data_structures.FlatMapping(dict)`.
  flat_mapping = _Global('haiku._src.data_structures', 'FlatMapping')
  tree = {
    m: _Reduce(flat_mapping, ({n: _array_record(x, 'numpy.core', True)
                               for n, x in v.items()},))
    for m, v in tiny_params.items()
  }  # fmt: skip
  path = tmp_path / 'flat.npz'
  with open(path, 'wb') as f:
    _HandPickler(f, protocol=4).dump(_Reduce(flat_mapping, (tree,)))
  loaded = pretrained.read_dm_pickle(path)
  assert type(loaded) is dict
  _assert_same_params(tiny_params, loaded)


@pytest.mark.parametrize('protocol', [2, 5])
def test_stdlib_pickle_of_numpy_arrays_loads(tiny_params, tmp_path, protocol):
  # Real numpy reductions: protocol 2 goes through _codecs.encode for the
  # bytes and protocol 5 through numpy's _frombuffer.
  path = tmp_path / 'w.pkl'
  path.write_bytes(pickle.dumps(tiny_params, protocol=protocol))
  _assert_same_params(tiny_params, pretrained.read_dm_pickle(path))


@pytest.mark.parametrize(
  'module, name', [('os', 'system'), ('posix', 'system'), ('builtins', 'exec')]
)
def test_refuses_foreign_globals_without_calling_them(tmp_path, module, name):
  marker = tmp_path / 'pwned'
  payload = _Reduce(_Global(module, name), (f'touch {marker}',))
  path = tmp_path / 'evil.npz'
  write_dm_pickle({}, path, extra={'NFNet/~/linear': {'w': payload}})
  with pytest.raises(pretrained.UnsafePickleError, match=f'{module}.{name}'):
    pretrained.read_dm_pickle(path)
  with pytest.raises(pretrained.UnsafePickleError):
    pretrained.load(path, 'F0')
  assert not marker.exists()


def test_refuses_object_arrays(tmp_path):
  path = tmp_path / 'obj.npz'
  path.write_bytes(pickle.dumps({'m': {'w': np.array([None, 1], object)}}))
  with pytest.raises(pretrained.UnsafePickleError, match='dtype'):
    pretrained.read_dm_pickle(path)


def test_corrupt_and_foreign_files_get_clear_errors(tiny_params, tmp_path):
  good = tmp_path / 'good.npz'
  write_dm_pickle(tiny_params, good)
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(good.read_bytes()[:1000])
  with pytest.raises(ValueError, match='truncated'):
    pretrained.read_params(truncated)
  text = tmp_path / 'notes.npz'
  text.write_text('hello')
  with pytest.raises(ValueError, match='not a DeepMind pickle'):
    pretrained.read_params(text)
  with pytest.raises(FileNotFoundError, match='download_pretrained'):
    pretrained.read_params(tmp_path / 'missing.npz')


_SMALL = {'m': {'w': np.arange(600, dtype=np.float32).reshape(20, 30)}}


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
@pytest.mark.parametrize('keep', [0.5, 0.99])
def test_truncated_safe_formats_raise_weights_error(tmp_path, suffix, keep):
  # The safetensors and zip readers' own errors ('incomplete metadata',
  # 'File is not a zip file') do not say the file is cut off.
  good = tmp_path / f'good{suffix}'
  pretrained.save_params(_SMALL, good)
  data = good.read_bytes()
  cut = tmp_path / f'cut{suffix}'
  cut.write_bytes(data[: int(len(data) * keep)])
  for read in (pretrained.read_params, pretrained.read_metadata):
    with pytest.raises(pretrained.WeightsError, match='truncated') as e:
      read(cut)
    assert str(cut) in str(e.value)
  if suffix == '.safetensors':
    with pytest.raises(pretrained.WeightsError, match='truncated'):
      timm_interop.load_timm(cut)


def test_damaged_npz_member_raises_weights_error(tmp_path):
  path = tmp_path / 'w.npz'
  pretrained.save_params(_SMALL, path)
  data = bytearray(path.read_bytes())
  data[len(data) // 3 : len(data) // 3 + 64] = b'\xff' * 64  # In the array.
  path.write_bytes(bytes(data))
  with pytest.raises(pretrained.WeightsError, match='damaged'):
    pretrained.read_params(path)


def test_directory_is_no_weights_file(tmp_path):
  readers = (
    pretrained.read_params,
    pretrained.read_metadata,
    pretrained.load,
    timm_interop.load_timm,
  )
  for read in readers:
    with pytest.raises(pretrained.WeightsError, match='is a directory') as e:
      read(tmp_path)
    assert '--workdir=DIR' in str(e.value)
    assert 'init_from=DIR' in str(e.value)


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_safe_formats_round_trip(tiny_params, tmp_path, suffix):
  path = tmp_path / f'w{suffix}'
  pretrained.save_params(tiny_params, path, {'variant': 'F0'})
  params, metadata = pretrained.read_params(path)
  _assert_same_params(tiny_params, params)
  assert metadata['variant'] == 'F0'
  assert metadata['layout'] == 'HWIO'
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]
  if suffix == '.npz':  # Readable by plain numpy with pickles disabled.
    with np.load(path, allow_pickle=False) as data:
      key = 'NFNet/~/linear/w'
      np.testing.assert_array_equal(
        data[key], tiny_params['NFNet/~/linear']['w']
      )


def test_load_reports_every_mismatch(tiny_params, tmp_path):
  params = {m: dict(v) for m, v in tiny_params.items()}
  del params['NFNet/~/final_conv']['gain']
  params['NFNet/~/extra'] = {'w': np.zeros(3, np.float32)}
  params['NFNet/~/nf_block_1/~/conv0']['w'] = np.zeros((1, 1, 2, 2), np.float32)
  path = tmp_path / 'bad.safetensors'
  pretrained.save_params(params, path, {'variant': 'F1'})
  with pytest.raises(pretrained.PretrainedMismatchError) as err:
    pretrained.load(path, 'F0', **TINY)
  message = str(err.value)
  assert '3 problems' in message
  assert 'missing: NFNet/~/final_conv/gain (384,)' in message
  assert 'unexpected: NFNet/~/extra/w (3,)' in message
  assert 'NFNet/~/nf_block_1/~/conv0/w is (1, 1, 2, 2)' in message
  assert "variant 'F1'" in message  # The file's own variant, as a hint.


def test_wrong_variant_is_reported(tiny_params, tmp_path):
  path = tmp_path / 'w.safetensors'
  pretrained.save_params(tiny_params, path)
  # F0+ has a wider stem and blocks than F0.
  with pytest.raises(pretrained.PretrainedMismatchError, match="'F0\\+'"):
    pretrained.load(path, 'F0+', **TINY)
  with pytest.raises(ValueError, match='Unknown variant'):
    pretrained.load(path, 'F9')


def test_expected_shapes_match_deepmind_f0():
  # Names and shapes from DeepMind's released F0 checkpoint (HWIO).
  shapes = pretrained.expected_shapes('F0')
  assert shapes['NFNet/~/stem_conv0'] == {
    'w': (3, 3, 3, 16), 'gain': (16,), 'bias': (16,)
  }  # fmt: skip
  assert shapes['NFNet/~/stem_conv3']['w'] == (3, 3, 64, 128)
  assert shapes['NFNet/~/nf_block'] == {'skip_gain': ()}
  assert shapes['NFNet/~/nf_block_1/~/conv1']['w'] == (3, 3, 128, 256)
  assert shapes['NFNet/~/nf_block_3/~/conv1']['w'] == (3, 3, 128, 768)
  assert shapes['NFNet/~/nf_block_9/~/conv_shortcut']['w'] == (
    1, 1, 1536, 1536
  )  # fmt: skip
  se = 'NFNet/~/nf_block/~/squeeze_excite/~/'
  assert shapes[se + 'linear'] == {'w': (256, 128), 'b': (128,)}
  assert shapes[se + 'linear_1'] == {'w': (128, 256), 'b': (256,)}
  assert shapes['NFNet/~/linear'] == {'w': (3072, 1000), 'b': (1000,)}
  total = sum(
    int(np.prod(s)) for leaves in shapes.values() for s in leaves.values()
  )
  assert total == 71_489_284  # README / timm parameter count.


def test_merge_pretrained_replaces_only_a_resized_classifier(tiny_params):
  init = {
    m: {n: np.full_like(x, 7.0) for n, x in v.items()}
    for m, v in tiny_params.items()
  }
  # Same classes: everything comes from the pretrained weights.
  _assert_same_params(
    tiny_params, pretrained.merge_pretrained(init, tiny_params)
  )
  # Another number of classes: a fresh classifier, all else pretrained.
  init['NFNet/~/linear'] = {
    'w': np.ones((384, 3), np.float32), 'b': np.ones(3, np.float32)
  }  # fmt: skip
  merged = pretrained.merge_pretrained(init, tiny_params)
  np.testing.assert_array_equal(merged['NFNet/~/linear']['w'], 1.0)
  np.testing.assert_array_equal(
    merged['NFNet/~/final_conv']['w'], tiny_params['NFNet/~/final_conv']['w']
  )
  # Any other mismatch is an error naming it.
  init['NFNet/~/final_conv'] = {
    n: np.zeros((1,) + x.shape, x.dtype)
    for n, x in tiny_params['NFNet/~/final_conv'].items()
  }
  with pytest.raises(pretrained.PretrainedMismatchError, match='final_conv'):
    pretrained.merge_pretrained(init, tiny_params)


def test_pretrained_table_lists_the_released_files():
  assert sorted(pretrained.PRETRAINED) == [f'F{n}' for n in range(7)]
  assert pretrained.PRETRAINED['F0']['url'] == (
    'https://storage.googleapis.com/dm-nfnets/F0_haiku.npz'
  )
  assert pretrained.PRETRAINED['F6']['top1'] == 86.5


def test_a_damaged_pickle_is_named_with_how_to_fetch_it_again(
  tiny_params, tmp_path
):
  # The message said "Download it again", which the download script skips
  # for a file that exists, and did not name the file.
  good = tmp_path / 'F0_haiku.npz'
  write_dm_pickle(tiny_params, good)
  cut = tmp_path / 'cut' / 'F0_haiku.npz'
  cut.parent.mkdir()
  cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  for read in (pretrained.read_params, pretrained.read_dm_pickle):
    with pytest.raises(pretrained.WeightsError) as error:
      read(cut)
    message = str(error.value)
    assert message.startswith(f"'{cut}' is damaged (truncated or corrupt: ")
    assert message.endswith(
      'Remove that file and download it again '
      '(scripts/download_pretrained.sh skips files that exist).'
    )


def test_a_read_failure_of_the_host_does_not_call_the_file_damaged():
  # Out of memory or a read error mid-file say nothing about the file:
  # they propagate instead of advising to remove it.
  class Failing(io.BytesIO):
    name = 'F6_haiku.npz'

    def __init__(self, error):
      super().__init__(b'\x80\x04' + b'\x00' * 64)
      self.error = error

    def read(self, *args):
      raise self.error

    readinto = readline = read

  for error in (MemoryError(), OSError(5, 'Input/output error')):
    with pytest.raises(type(error)):
      pretrained.read_dm_pickle(Failing(error))


def test_keys_that_are_not_module_param_say_what_is_read(tmp_path):
  # A '.'-joined flattening of DeepMind's names was told to use timm's
  # loader, which cannot read it either.
  dotted = tmp_path / 'dm_flat.npz'
  np.savez(dotted, **{'NFNet.final_conv.bias': np.zeros(3, np.float32)})
  with pytest.raises(pretrained.WeightsError) as error:
    pretrained.read_params(dotted)
  message = str(error.value)
  assert message.startswith(
    f"'{dotted}': key 'NFNet.final_conv.bias' is not 'module/param' (e.g. "
    "'NFNet/~/linear/w'): it joins Haiku's names with '.'"
  )
  assert 'nfnets.pretrained.save_params' in message
  assert 'timm' not in message
  plain = tmp_path / 'plain.npz'
  np.savez(plain, w=np.zeros(3, np.float32))
  with pytest.raises(pretrained.WeightsError, match="key 'w' is not 'module"):
    pretrained.read_params(plain)


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_saving_into_a_directory_is_refused_before_writing(tmp_path, suffix):
  # It wrote the whole file as '<dir>.tmp-PID', failed to rename it over
  # the directory and left it there.
  out = tmp_path / f'out{suffix}'
  out.mkdir()
  with pytest.raises(IsADirectoryError, match='is a directory; name a file'):
    pretrained.save_params(_SMALL, out)
  assert sorted(os.listdir(tmp_path)) == [out.name]
  assert os.listdir(out) == []
