"""Parameters moved off their initial values, for forward-pass references."""

import jax


def perturb(params, seed=2, scale=0.3):
  """Every parameter plus N(0, scale^2) noise: no zero init hides a term."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [
    v + scale * jax.random.normal(k, v.shape)
    for v, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(tree, noisy)
