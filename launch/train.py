"""Train a model with the shared trainer.

  python -m launch.train --config=configs/magvit.py:tiny --workdir=runs/magvit_tiny \
      [--config.train.num_steps=2000 ...]

Running the same command again resumes from the workdir's latest checkpoint.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and variant, e.g. "
                                          "configs/magvit.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()

  from tokdiff import trainer  # imported after the runtime set-up on purpose

  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
