"""MaskGIT configs: the masked token transformer, trained on a token cache.

Train a tokenizer (configs/magvit.py), write its token cache, then train on the cache:
  python -m launch.tokenize --workdir=runs/magvit_tiny --output=runs/cache_tiny
  python -m launch.train --config=configs/maskgit.py:tiny --workdir=runs/maskgit_tiny \
      --config.data.token_cache.path=runs/cache_tiny
Variants:
  tiny   trains in minutes on 2 CPU cores, sized for the tiny tokenizer's 3x8x8 grid of 10-bit
         tokens.
  base   for accelerators, sized for the base tokenizer's 5x16x16 grid of 18-bit tokens.
  smoke  trains in seconds, for the tests.
The token grid, the bits K per token and the number of classes come from the cache info, so the
same variant trains on any cache. The `tiny` and `base` sizes match the parameter count of the
WALT variants of the same name (configs/walt.py) within 10%.
"""

import ml_collections

from configs import common


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_family = "maskgit"
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
  config.model.embed_dim = 768
  config.model.depth = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 3072
  config.model.dropout = 0.1
  # G groups of K/G bits, each with its own embedding table and 2^(K/G)-way output head. G must
  # divide the cache's K, and 2 gives two 512-way heads for the base tokenizer's 18 bits.
  config.model.factor_groups = 2

  config.loss = ml_collections.ConfigDict()
  config.loss.label_dropout = 0.1  # trains the unconditional branch for guidance
  config.loss.mask_schedule = "cosine"  # cosine | linear

  config.sampling = ml_collections.ConfigDict()
  config.sampling.num_steps = 12  # decoding steps, at most t * h * w
  config.sampling.guidance_scale = 2.0  # 1 = conditional, 0 = unconditional
  config.sampling.temperature = 4.5  # Gumbel noise on the confidence, annealed to 0
  config.sampling.mask_schedule = "cosine"

  if variant in ("tiny", "smoke"):
    _shrink_to_tiny(config)
  if variant == "smoke":
    _shrink_to_smoke(config)
  elif variant not in ("tiny", "base"):
    raise ValueError(f"unknown maskgit config variant {variant!r}; use 'tiny', 'base' or "
                     "'smoke'.")

  config.lock()
  return config


def _shrink_to_tiny(config: ml_collections.ConfigDict) -> None:
  """Set sizes that train in minutes on 2 CPU cores on the tiny tokenizer's cache."""
  config.model.embed_dim = 128
  config.model.depth = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.factor_groups = 2  # two 32-way heads for the tiny tokenizer's 10 bits

  config.sampling.num_steps = 8

  common.shrink_loop_to_cpu(config, num_steps=600)


def _shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrink runs to seconds, enough to check training, checkpoints and sampling end to end."""
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.model.dropout = 0.0
  config.model.factor_groups = 1  # divides every K

  config.sampling.num_steps = 4  # the smoke tokenizer's 2x2x2 grid has 8 tokens

  common.shrink_loop_to_smoke(config)
  config.eval.num_samples = 2
