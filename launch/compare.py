"""Compare MaskGIT and WALT trained on one tokenizer's cached tokens, and write the report.

  python -m launch.compare --config=configs/compare.py:tiny --workdir=runs/compare_tiny

Writes WORKDIR/report.md and WORKDIR/report.html. Rerunning the command reuses finished stages.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. "
                                          "configs/compare.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()

  from tokdiff import comparison  # imported after the runtime set-up on purpose

  try:
    comparison.run_comparison(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
