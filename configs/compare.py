"""The tokenizer-versus-diffusion comparison: one tokenizer, one token cache, two generators.

Run the CPU-sized comparison on the embedded Atari clips and write DIR/report.md and report.html:
  python -m launch.compare --config=configs/compare.py:tiny --workdir=runs/compare_tiny
Variants: `tiny` (2 CPU cores), `base` (accelerators), `smoke` (seconds; what the tests run).
Both generators get the same cache, batch size, step count and mesh; override them once with
`--config.generator_steps=N` and `--config.generator_batch_size=B`, or a sub-config directly,
e.g. `--config.maskgit.sampling.num_steps=12`.
"""

import ml_collections

from configs import magvit
from configs import maskgit
from configs import walt


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in ("tiny", "base", "smoke"):
    raise ValueError(f"unknown compare config variant {variant!r}; use 'tiny', 'base' or "
                     "'smoke'.")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.tokenizer = magvit.get_config(variant)
  config.maskgit = maskgit.get_config(variant)
  config.walt = walt.get_config(variant)

  config.latent = "lfq"  # diffusion latent in the cache: lfq codes | continuous
  config.generator_steps = config.maskgit.train.num_steps
  config.generator_batch_size = config.maskgit.train.batch_size
  config.num_videos = 64  # generated and real videos per FVD estimate
  config.fvd_batch_size = 16
  config.seed = 0

  if variant == "tiny":
    config.tokenizer.train.num_steps = 300
    config.generator_steps = 300
    config.num_videos = 48
    config.tokenizer.data.atari.num_eval_clips = 48
  elif variant == "smoke":
    config.num_videos = 8
    config.fvd_batch_size = 8
    config.tokenizer.data.num_frames = 9  # I3D needs at least 9 frames
  config.lock()
  return config
