"""A peer parity check: our NFNet and timm's `dm_nfnet_f*` on the same weights.

An independent fidelity check of the model and of
`nfnets.pretrained.timm_interop`, run by hand (not by the test suite): random
weights (gains, biases and skip gains randomised too, so that every
residual branch contributes) are exported to a timm state dict, loaded into
timm's model, and both networks run the same images in eval mode. Needs
torch and timm, which are not project requirements, and this repository on
PYTHONPATH (the project's venv lacks torch, timm's lacks haiku):

  PYTHONPATH=.:.venv/lib/python3.11/site-packages /path/to/torch/python \
    scripts/check_timm_parity.py --variant=F0 --image_size=192

Prints the largest absolute and relative logit differences as JSON.
"""

import argparse
import json

import numpy as np

# Leaves whose init (1 or 0) would hide a mismatch; weights are random anyway.
_RANDOMISED = ('gain', 'bias', 'b', 'skip_gain')


def _parse():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--variant', default='F0')
  p.add_argument('--image_size', type=int, default=192)
  p.add_argument('--batch_size', type=int, default=2)
  p.add_argument(
    '--match_reference',
    action='store_true',
    help="Undo timm's two known departures from DeepMind's model: WS eps "
    '1e-5 added to the variance (DeepMind: max(fan_in * var, 1e-4)) and '
    'exact-erf GELU (DeepMind: the tanh form).',
  )
  return p.parse_args()


def _randomised(params, rng):
  """Makes gains, biases and skip gains non-trivial (init: 1, 0, 0)."""
  out = {}
  for module, leaves in params.items():
    out[module] = {}
    for name, x in leaves.items():
      x = np.asarray(x, np.float32)
      if name in _RANDOMISED:
        x = x + rng.normal(0.0, 0.2, x.shape).astype(np.float32)
      out[module][name] = x
  return out


def _make_model(variant):
  import ml_collections  # noqa: PLC0415

  from nfnets import models  # noqa: PLC0415

  config = ml_collections.ConfigDict(
    dict(name='NFNet', kwargs=models.nfnet_kwargs(variant=variant))
  )
  return models.make_model(config, num_classes=1000)


def _match_reference(net, torch):
  """Sets timm's WS eps to ~0 and its GELUs to the tanh form, in place."""
  gelu = torch.nn.functional.gelu
  for module in net.modules():
    if hasattr(module, 'eps') and hasattr(module, 'gain'):
      module.eps = 1e-12  # Must be > 0; negligible against var.
    if getattr(module, 'act_fn', None) is not None and 'gelu' in str(
      module.act_fn
    ):
      module.act_fn = lambda x, inplace=False: gelu(x, approximate='tanh')


def _import_timm_and_torch():
  """(timm, torch), or exit with one line saying how to get them."""
  try:
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415
  except ModuleNotFoundError as e:
    if e.name not in ('timm', 'torch'):
      raise
    raise SystemExit(
      f'Error: this check needs torch and timm ({e.name} is missing): '
      'install both (pip install torch timm) in an environment and run the '
      'script with its python, with this repository on PYTHONPATH.'
    ) from None
  return timm, torch


def main():
  """Runs both models and prints the logit differences."""
  args = _parse()  # First: --help works without torch.
  timm, torch = _import_timm_and_torch()
  import jax  # noqa: PLC0415

  from nfnets.pretrained import timm_interop  # noqa: PLC0415

  rng = np.random.default_rng(0)
  images = rng.normal(
    size=(args.batch_size, args.image_size, args.image_size, 3)
  ).astype(np.float32)
  model = _make_model(args.variant)
  params, _ = model.init(jax.random.PRNGKey(0), images[:1], False)
  params = _randomised(jax.device_get(params), rng)
  out, _ = jax.jit(model.apply, static_argnums=4)(
    params, {}, None, images, False
  )
  ours = np.asarray(out['logits'])

  state = timm_interop.to_timm_state_dict(params)
  net = timm.create_model(f'dm_nfnet_{args.variant.lower()}', pretrained=False)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  net.eval()
  if args.match_reference:
    _match_reference(net, torch)
  with torch.no_grad():
    theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  diff = np.abs(ours - theirs)
  print(
    json.dumps(
      dict(
        variant=args.variant,
        image_size=args.image_size,
        timm=timm.__version__,
        torch=torch.__version__,
        logit_scale=float(np.abs(theirs).max()),
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(diff.max() / np.abs(theirs).max()),
        same_top1=bool(np.all(ours.argmax(-1) == theirs.argmax(-1))),
      )
    )
  )


if __name__ == '__main__':
  main()
