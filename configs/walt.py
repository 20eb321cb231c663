"""WALT configs: the window attention latent diffusion transformer, trained on a token cache.

Train a tokenizer (configs/magvit.py), write its token cache, then train on the cache:
  python -m launch.tokenize --workdir=runs/magvit_tiny --output=runs/cache_tiny
  python -m launch.train --config=configs/walt.py:tiny --workdir=runs/walt_tiny \
      --config.data.token_cache.path=runs/cache_tiny
Variants:
  tiny   trains in minutes on 2 CPU cores, sized for the tiny tokenizer's 3x8x8 grid of 10
         channels.
  base   for accelerators, sized for the base tokenizer's 5x16x16 grid of 18 channels.
  smoke  trains in seconds, for the tests.
The latent grid, the channels K and the number of classes come from the cache info, and so does
the kind of latent (LFQ codes or normalised continuous latents, `launch.tokenize --latent`). The
`tiny` and `base` sizes match the parameter count of the MaskGIT variants of the same name
(configs/maskgit.py) within 10%. A WALT block has about 1.5 times the parameters of a MaskGIT
block of the same width because of its AdaLN modulation layer, so WALT has 2/3 of the depth.
"""

import ml_collections

from configs import common


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_family = "walt"
  config.variant = variant
  config.seed = 0

  config.data = common.data_config()
  config.data.source = "token_cache"
  config.data.eval_sources = ("token_cache",)
  config.mesh = common.mesh_config()
  config.optimizer = common.optimizer_config()
  config.train = common.train_config()
  config.eval = common.eval_config()
  config.eval.num_samples = 8  # class-conditional samples per evaluation, labels 0, 1, ...

  config.model = ml_collections.ConfigDict()
  config.model.patch_size = 1  # spatial patch size in latent positions
  config.model.embed_dim = 768
  config.model.depth = 8  # even blocks use spatial windows, odd blocks spatiotemporal ones
  config.model.num_heads = 12
  config.model.mlp_dim = 3072
  config.model.spatial_window = ()  # (wh, ww) in tokens; () attends over whole frames
  config.model.spatiotemporal_window = (5, 8, 8)  # (wt, wh, ww) in tokens
  config.model.self_condition = True
  config.model.qk_norm = True

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear
  # Rescale so that t = 1 is pure noise, where the sampler starts.
  config.diffusion.zero_terminal_snr = True

  config.loss = ml_collections.ConfigDict()
  config.loss.label_dropout = 0.1  # trains the unconditional branch for guidance
  config.loss.self_cond_prob = 0.5  # share of batches trained with a self-conditioning pass

  config.sampling = ml_collections.ConfigDict()
  config.sampling.num_steps = 50  # DDIM steps
  config.sampling.guidance_scale = 2.0  # 1 = conditional, 0 = unconditional
  # Clip each x0 estimate to [-1, 1] when the cache contains LFQ codes (no effect on continuous
  # latents).
  config.sampling.clip_lfq_x0 = True

  if variant in ("tiny", "smoke"):
    _shrink_to_tiny(config)
  if variant == "smoke":
    _shrink_to_smoke(config)
  elif variant not in ("tiny", "base"):
    raise ValueError(f"unknown walt config variant {variant!r}; use 'tiny', 'base' or 'smoke'.")

  config.lock()
  return config


def _shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
  """Set sizes that train in minutes on 2 CPU cores on the tiny tokenizer's cache."""
  config.model.embed_dim = 128
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.spatiotemporal_window = (3, 4, 4)

  config.sampling.num_steps = 25

  common.shrink_loop_to_cpu(config, num_steps=600)


def _shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrink runs to seconds, enough to check training, checkpoints and sampling end to end."""
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.spatiotemporal_window = (2, 2, 2)

  config.sampling.num_steps = 4

  common.shrink_loop_to_smoke(config)
  config.eval.num_samples = 2
