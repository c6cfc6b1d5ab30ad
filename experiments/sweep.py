r"""Runs a sweep of config overrides and tabulates the final metrics.

    python -m experiments.sweep --sweep=configs/sweeps/agc_ablation.py \
      --outdir=runs/agc_ablation

    # Print one `python -m experiments.train` line per point (for a cluster)
    # instead of running them here; running the command above afterwards
    # collects their results:
    python -m experiments.sweep --sweep=configs/sweeps/agc_ablation.py \
      --outdir=runs/agc_ablation --launch

Each point trains in <outdir>/<point>; rerunning skips finished points and
retries failed ones. Results: <outdir>/results.csv, results.md and
results.png. A point that fails (its traceback in
<outdir>/<point>/sweep_error.log) does not stop the others; the command then
exits with status 1, naming the failed points. See docs/research.md.
"""

import sys

from absl import app, flags

from experiments import common

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/).')
_OUTDIR = flags.DEFINE_string('outdir', None, 'Output directory.')
_LAUNCH = flags.DEFINE_bool(
  'launch', False, 'Only print the launch command of every point.'
)
flags.mark_flags_as_required(['sweep', 'outdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nfnets.research import sweep  # noqa: PLC0415  (keeps --help fast)

  spec = sweep.load_sweep(_SWEEP.value)
  if _LAUNCH.value:
    sweep.check_outdir(spec, _OUTDIR.value, _SWEEP.value)
    # Checks every point's config first (a bad key or value is an error).
    print('\n'.join(sweep.launch_lines(spec, _OUTDIR.value)))
    return
  rows = sweep.run_sweep(spec, _OUTDIR.value, source=_SWEEP.value)
  print(f'Results in {_OUTDIR.value}/results.md')
  failed = sweep.failed_summary(spec, rows, _OUTDIR.value)
  if failed:
    sys.stdout.flush()
    sys.stderr.write(f'Error: {failed}\n')
    sys.exit(common.FAILURE_EXIT)


if __name__ == '__main__':
  common.run(main)
