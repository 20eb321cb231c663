"""MAGVIT-v2-style tokenizer configs.

Train the CPU-sized variant on the embedded Atari clips:
  python -m launch.train --config=configs/magvit.py:tiny --workdir=runs/magvit_tiny
Variants: `tiny` (2 CPU cores, minutes), `base` (17x128x128 clips, accelerators), `smoke`
(seconds; what the tests train).
Override any field with `--config.a.b=value`, e.g. `--config.train.num_steps=2000`.
"""

import ml_collections

from configs import common


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_family = "magvit"
  config.variant = variant
  config.seed = 0

  config.data = common.data_config()
  config.mesh = common.mesh_config()
  config.optimizer = common.optimizer_config()
  config.train = common.train_config()
  config.eval = common.eval_config()

  config.model = ml_collections.ConfigDict()
  config.model.base_channels = 128
  config.model.channel_multipliers = (1, 2, 2, 4)
  config.model.num_res_blocks = 2
  # One flag per stage: each True halves that axis, so three spatial flags give 8x and two
  # temporal flags give 4x (1 + 4k frames -> 1 + k latent frames).
  config.model.temporal_downsample = (False, True, True, False)
  config.model.spatial_downsample = (True, True, True, False)
  config.model.latent_bits = 18
  config.model.num_groups = 32
  config.model.entropy_temperature = 0.01
  config.model.entropy_exact_max_bits = 12

  config.loss = ml_collections.ConfigDict()
  config.loss.recon_loss = "l1"  # l1 | l2
  config.loss.recon_weight = 1.0
  config.loss.entropy_weight = 0.1
  config.loss.commitment_weight = 0.25
  # Hooks for the MAGVIT-v2 perceptual and GAN losses; non-zero weights are not supported yet.
  config.loss.perceptual_weight = 0.0
  config.loss.gan_weight = 0.0

  if variant in ("tiny", "smoke"):
    _shrink_to_tiny(config)
  if variant == "smoke":
    _shrink_to_smoke(config)
  elif variant not in ("tiny", "base"):
    raise ValueError(f"unknown magvit config variant {variant!r}; use 'tiny', 'base' or "
                     "'smoke'.")

  config.lock()
  return config


def _shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
  """Sizes that train in minutes on 2 CPU cores and still show real reconstructions."""
  config.data.num_frames = 9
  config.data.height = 32
  config.data.width = 32
  config.data.atari.num_train_clips = 256
  config.data.atari.num_eval_clips = 16

  config.model.base_channels = 16
  config.model.channel_multipliers = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.temporal_downsample = (False, True, True)
  # 4x spatially: at 32x32 an 8x tokenizer keeps only 4x4 tokens of 10 bits per latent frame,
  # too few to reconstruct more than the background colours.
  config.model.spatial_downsample = (True, True, False)
  config.model.latent_bits = 10
  config.model.num_groups = 8

  common.shrink_loop_to_cpu(config, num_steps=500)


def _shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrink to a few seconds per run, enough to check training, checkpoints and resume."""
  config.data.num_frames = 5
  config.data.height = 16
  config.data.width = 16
  config.data.eval_sources = ("atari",)
  config.data.atari.num_train_clips = 16
  config.data.atari.num_eval_clips = 8
  config.data.atari.max_warmup_steps = 20

  config.model.base_channels = 8
  config.model.channel_multipliers = (1, 1, 2)
  config.model.spatial_downsample = (True, True, True)
  config.model.num_groups = 4
  config.model.latent_bits = 6

  common.shrink_loop_to_smoke(config)
  config.eval.num_visualized = 2
