"""Argparse types shared by the standalone scripts (standard library only).

The scripts run as files (`python scripts/x.py`), which puts this folder on
`sys.path`, so `import arg_types` works from each of them, also from a
Python environment that has only torch and timm (`bench_timm.py`).
"""

import argparse


def int_at_least(lowest: int):
  """An argparse type: an int >= `lowest` (a count of 0 divides by 0)."""

  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < lowest:
      raise argparse.ArgumentTypeError(f'pass at least {lowest}, got {value}')
    return value

  return parse
