"""StableHLO programs serialized with `jax.export`.

`write_stablehlo` exports the serving function with the folded params as
constants and a symbolic batch size (and image size, with eval
preprocessing) and writes `Exported.serialize()`'s bytes. Any JAX of a
compatible calling convention runs it without this package:

    exported = jax.export.deserialize(open(path, 'rb').read())
    logits = exported.call(images)['logits']
"""

import jax
from jax import export as jax_export

from nfnets.export import serving


def export_stablehlo(
  spec: serving.ExportSpec,
  params,
  state,
  *,
  preprocess: str = 'none',
  platforms: tuple[str, ...] = ('cpu',),
) -> jax_export.Exported:
  """`jax.export` of the serving function `images -> {'logits'}`.

  Args:
    spec: the export spec.
    params: folded params (`nfnets.export.fold_weight_standardization`).
    state: the model state (`{}` for the NF models).
    preprocess: the input signature, 'none' or 'eval'.
    platforms: the platforms to lower for ('cpu', 'cuda', 'rocm', 'tpu').

  Returns:
    The `jax.export.Exported`.
  """
  serve = serving.make_serving_fn(spec, preprocess)
  shape, dtype, _ = serving.input_spec(spec, preprocess)
  images = jax.ShapeDtypeStruct(jax_export.symbolic_shape(shape), dtype)
  fn = jax.jit(lambda x: serve(params, state, x))
  return jax_export.export(fn, platforms=tuple(platforms))(images)


def write_stablehlo(
  spec: serving.ExportSpec, params, state, out: str, **kwargs
) -> str:
  """Writes `export_stablehlo(...)`'s serialized bytes to `out`.

  Args:
    spec: the export spec.
    params: folded params.
    state: the model state.
    out: the file to write.
    **kwargs: `preprocess` and `platforms`, as in `export_stablehlo`.

  Returns:
    `out`.
  """
  exported = export_stablehlo(spec, params, state, **kwargs)
  with open(out, 'wb') as f:
    f.write(exported.serialize())
  return out
