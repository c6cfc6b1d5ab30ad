"""Choosing an operation's implementation by backend.

Each op with backend-specific forms offers the modes ('auto', the CPU form,
'native'); 'auto' means the CPU form on XLA:CPU and XLA's own operation on
GPU and TPU, which have fast kernels for it.
"""

import jax


def resolve_mode(mode: str, *, name: str, modes: tuple, cpu: str) -> str:
  """Maps a mode to the implementation used on this backend.

  Args:
    mode: one of `modes`.
    name: the setting's name, for the error message.
    modes: the valid modes: ('auto', `cpu`, 'native').
    cpu: what 'auto' means on a CPU backend.

  Returns:
    `mode`, or for 'auto' `cpu` on a CPU backend and 'native' elsewhere.

  Raises:
    ValueError: for an unknown mode; the message lists the valid ones.
  """
  if mode not in modes:
    raise ValueError(f'Unknown {name} {mode!r}; choose one of {modes}.')
  if mode == 'auto':
    return cpu if jax.default_backend() == 'cpu' else 'native'
  return mode
