"""Tests for pretrained.timm_interop: Haiku <-> timm `dm_nfnet_*` state dicts.

The expected timm layout is derived here from timm's `dm_nfnet_f0`
definition (channels 256/512/1536/1536, depths 1/2/6/3, a 4-conv stem to
128 channels, bottleneck ratio 0.5 in groups of 128, SE ratio 0.5, final conv
3072, ScaledStdConv2dSame gains of shape (O, 1, 1, 1)), and the Haiku input
from DeepMind's published F0 names and shapes, independently of the model
code.
"""

import os

import numpy as np
import pytest

from nfnets import pretrained
from nfnets.pretrained import timm_interop

F0_DEPTHS = (1, 2, 6, 3)
F0_CHANNELS = (256, 512, 1536, 1536)


def _conv(out_ch, in_ch, k):
  return {'w': (k, k, in_ch, out_ch), 'gain': (out_ch,), 'bias': (out_ch,)}


def deepmind_f0_shapes(depths=F0_DEPTHS, channels=F0_CHANNELS):
  """DeepMind's F0 checkpoint layout: {module: {name: shape}}, HWIO."""
  shapes, in_ch = {}, 3
  for i, ch in enumerate((16, 32, 64, 128)):
    shapes[f'NFNet/~/stem_conv{i}'] = _conv(ch, in_ch, 3)
    in_ch = ch
  g = 0
  for depth, out_ch in zip(depths, channels, strict=True):
    mid = out_ch // 2 // 128 * 128
    for b in range(depth):
      name = 'NFNet/~/nf_block' + (f'_{g}' if g else '')
      shapes[name] = {'skip_gain': ()}
      shapes[f'{name}/~/conv0'] = _conv(mid, in_ch, 1)
      shapes[f'{name}/~/conv1'] = _conv(mid, 128, 3)
      shapes[f'{name}/~/conv1b'] = _conv(mid, 128, 3)
      shapes[f'{name}/~/conv2'] = _conv(out_ch, mid, 1)
      if b == 0:
        shapes[f'{name}/~/conv_shortcut'] = _conv(out_ch, in_ch, 1)
      se = f'{name}/~/squeeze_excite/~/'
      shapes[se + 'linear'] = {'w': (out_ch, out_ch // 2), 'b': (out_ch // 2,)}
      shapes[se + 'linear_1'] = {'w': (out_ch // 2, out_ch), 'b': (out_ch,)}
      in_ch, g = out_ch, g + 1
  shapes['NFNet/~/final_conv'] = _conv(2 * in_ch, in_ch, 1)
  shapes['NFNet/~/linear'] = {'w': (2 * in_ch, 1000), 'b': (1000,)}
  return shapes


def timm_dm_nfnet_f0_shapes():
  """timm's `dm_nfnet_f0` state dict: {key: shape}, PyTorch layouts."""

  def conv(prefix, out_ch, in_ch, k):
    return {
      f'{prefix}.weight': (out_ch, in_ch, k, k),
      f'{prefix}.gain': (out_ch, 1, 1, 1),
      f'{prefix}.bias': (out_ch,),
    }

  sd, in_ch = {}, 3
  for i, ch in enumerate((16, 32, 64, 128)):
    sd.update(conv(f'stem.conv{i + 1}', ch, in_ch, 3))
    in_ch = ch
  for s, (depth, out_ch) in enumerate(zip(F0_DEPTHS, F0_CHANNELS, strict=True)):
    mid, rd = out_ch // 2 // 128 * 128, out_ch // 2
    for b in range(depth):
      p = f'stages.{s}.{b}'
      if b == 0:
        sd.update(conv(f'{p}.downsample.conv', out_ch, in_ch, 1))
      sd.update(conv(f'{p}.conv1', mid, in_ch, 1))
      sd.update(conv(f'{p}.conv2', mid, 128, 3))
      sd.update(conv(f'{p}.conv2b', mid, 128, 3))
      sd.update(conv(f'{p}.conv3', out_ch, mid, 1))
      sd[f'{p}.attn_last.fc1.weight'] = (rd, out_ch, 1, 1)
      sd[f'{p}.attn_last.fc1.bias'] = (rd,)
      sd[f'{p}.attn_last.fc2.weight'] = (out_ch, rd, 1, 1)
      sd[f'{p}.attn_last.fc2.bias'] = (out_ch,)
      sd[f'{p}.skipinit_gain'] = ()
      in_ch = out_ch
  sd.update(conv('final_conv', 3072, 1536, 1))
  sd['head.fc.weight'] = (1000, 3072)
  sd['head.fc.bias'] = (1000,)
  return sd


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {
    m: {n: rng.standard_normal(s, np.float32) for n, s in leaves.items()}
    for m, leaves in shapes.items()
  }


# F0's stage depths pattern, narrower channels: small but every mapping case.
SMALL = dict(depths=(1, 2, 3, 2), channels=(256, 256, 384, 384))


def _zero_params(shapes):
  # Broadcast views: the F0 layout check needs shapes, not 285 MB of data.
  return {
    m: {n: np.broadcast_to(np.float32(0), s) for n, s in leaves.items()}
    for m, leaves in shapes.items()
  }


def test_f0_export_matches_timm_dm_nfnet_f0_layout():
  state_dict = timm_interop.to_timm_state_dict(
    _zero_params(deepmind_f0_shapes())
  )
  got = {k: tuple(v.shape) for k, v in state_dict.items()}
  want = timm_dm_nfnet_f0_shapes()
  assert sorted(got.keys() - want) == []
  assert sorted(want.keys() - got) == []
  assert {k: got[k] for k in want if got[k] != want[k]} == {}
  assert sum(int(np.prod(s)) for s in got.values()) == 71_489_284


def test_round_trip_is_exact(tmp_path):
  # Random values, so any swapped or transposed entry would show.
  params = _random_params(deepmind_f0_shapes(**SMALL))
  path = tmp_path / 'dm_nfnet_f0.safetensors'
  timm_interop.save_timm(params, path)
  back = timm_interop.load_timm(path)
  assert sorted(back) == sorted(params)
  for module, leaves in params.items():
    assert sorted(back[module]) == sorted(leaves)
    for name, x in leaves.items():
      assert back[module][name].shape == x.shape, (module, name)
      np.testing.assert_array_equal(back[module][name], x)


def test_tensor_layouts_compute_the_same_function():
  params = _random_params(deepmind_f0_shapes(**SMALL), seed=1)
  sd = timm_interop.to_timm_state_dict(params)
  rng = np.random.RandomState(2)
  # A 3x3 conv at one output position: sum_hwi x[h,w,i] * w[h,w,i,o] in
  # Haiku HWIO equals sum_ihw x[i,h,w] * weight[o,i,h,w] in PyTorch OIHW.
  w = params['NFNet/~/stem_conv1']['w']
  patch = rng.randn(3, 3, 16)
  np.testing.assert_allclose(
    np.einsum('hwi,hwio->o', patch, w),
    np.einsum('ihw,oihw->o', patch.transpose(2, 0, 1),
              sd['stem.conv2.weight']),
    rtol=1e-5,
  )  # fmt: skip
  # Squeeze-excite linear (I, O) == timm 1x1 conv (O, I, 1, 1).
  se = params['NFNet/~/nf_block_4/~/squeeze_excite/~/linear']['w']
  x = rng.randn(384)
  np.testing.assert_allclose(
    x @ se, sd['stages.2.1.attn_last.fc1.weight'][:, :, 0, 0] @ x, rtol=1e-5
  )
  # Classifier (I, O) == timm Linear (O, I).
  x = rng.randn(768)
  np.testing.assert_allclose(
    x @ params['NFNet/~/linear']['w'], sd['head.fc.weight'] @ x, rtol=1e-5
  )
  np.testing.assert_array_equal(
    sd['stages.3.1.conv3.gain'][:, 0, 0, 0],
    params['NFNet/~/nf_block_7/~/conv2']['gain'],
  )
  assert (
    sd['stages.1.1.skipinit_gain'] == params['NFNet/~/nf_block_2']['skip_gain']
  )


def test_pretrained_load_reads_timm_files(tmp_path):
  params = _random_params(deepmind_f0_shapes(**SMALL), seed=3)
  path = tmp_path / 'timm.safetensors'
  timm_interop.save_timm(params, path)
  # `read_params` (hence `load`) recognises the timm layout.
  loaded, _ = pretrained.read_params(path)
  np.testing.assert_array_equal(
    loaded['NFNet/~/nf_block_3/~/conv1']['w'],
    params['NFNet/~/nf_block_3/~/conv1']['w'],
  )


def test_foreign_timm_keys_are_listed():
  sd = {
    'stem.conv1.weight': np.zeros((16, 3, 3, 3), np.float32),
    'stages.0.0.attn.fc1.weight': np.zeros((8, 16, 1, 1), np.float32),
    'head.fc.weight': np.zeros((10, 16), np.float32),
    'blocks.0.norm.weight': np.zeros(16, np.float32),
  }
  with pytest.raises(ValueError, match='dm_nfnet') as err:
    timm_interop.from_timm_state_dict(sd)
  assert 'stages.0.0.attn.fc1.weight' in str(err.value)
  assert 'blocks.0.norm.weight' in str(err.value)


def test_a_failed_or_misdirected_save_leaves_no_file(tmp_path):
  # The temporary file stayed behind when the conversion or the rename
  # failed (a directory as the destination: after writing it all).
  bad = {'Foo/~/bar': {'w': np.zeros(3, np.float32)}}
  with pytest.raises(ValueError, match='No timm equivalent for Haiku module'):
    timm_interop.save_timm(bad, tmp_path / 'x.safetensors')
  assert os.listdir(tmp_path) == []
  folder = tmp_path / 'out.safetensors'
  folder.mkdir()
  params = _random_params(deepmind_f0_shapes(**SMALL))
  with pytest.raises(IsADirectoryError, match='is a directory'):
    timm_interop.save_timm(params, folder)
  assert os.listdir(tmp_path) == ['out.safetensors']
  assert os.listdir(folder) == []
