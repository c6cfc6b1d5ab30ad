"""The errors of reading and checking weights files.

Every problem with a weights file is a `WeightsError` (a `ValueError`), so
callers can catch one class; the subclasses say which check failed.
"""

import pickle


class WeightsError(ValueError):
  """A weights file is unreadable, unsafe or does not fit the model."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
  """A pickle referenced a global outside the numpy-array allow-list."""


class PretrainedMismatchError(WeightsError):
  """Parameter names or shapes do not match the requested model."""
