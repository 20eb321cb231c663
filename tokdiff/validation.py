"""Config checks that run before anything is compiled, so a bad value fails in seconds."""

import os

import ml_collections

from tokdiff import sharding as sharding_lib
from tokdiff.sharding import ConfigError

DATA_SOURCES = ("atari", "sample_videos", "video_folder", "tfds", "token_cache")


def check_num_frames(num_frames: int, temporal_factor: int, field: str = "data.num_frames"):
  """Require 1 + f*k frames, the only lengths a causal tokenizer with factor f maps exactly."""
  if num_frames >= 1 and (num_frames - 1) % temporal_factor == 0:
    return
  below = max(1, 1 + ((num_frames - 1) // temporal_factor) * temporal_factor)
  above = below + temporal_factor
  raise ConfigError(
      f"{field}={num_frames} is not of the form 1+{temporal_factor}k; use {below} or {above}.")


def check_batch(batch_size: int, mesh_shape: tuple[int, ...], num_processes: int, field: str):
  """Require a global batch that splits evenly over data-parallel shards and processes."""
  data_parallel = mesh_shape[0] * mesh_shape[1]
  step = data_parallel * num_processes // _gcd(data_parallel, num_processes)
  if batch_size <= 0 or batch_size % step:
    valid = max(step, (batch_size // step) * step)
    raise ConfigError(
        f"{field}={batch_size} does not divide evenly over {data_parallel} data-parallel shards "
        f"and {num_processes} processes; use a multiple of {step}, e.g. {valid}.")


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def check_positive(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> None:
  for field in fields:
    value = config
    for part in field.split("."):
      value = value[part]
    if value <= 0:
      raise ConfigError(f"{field}={value} must be positive.")


def check_token_cache_path(data: ml_collections.ConfigDict) -> None:
  """Require data.token_cache.path to be a folder that contains a finished token cache."""
  path = data.token_cache.path
  fix = ("Build the cache with `python -m launch.tokenize --workdir=TOKENIZER_DIR "
         "--output=CACHE_DIR` and set --config.data.token_cache.path=CACHE_DIR.")
  if not path:
    raise ConfigError(f"data.token_cache.path is empty, but the 'token_cache' source is used. "
                      f"{fix}")
  if not os.path.isdir(path):
    raise ConfigError(f"data.token_cache.path={path!r} does not exist or is not a folder. {fix}")
  if not os.path.isfile(os.path.join(path, "cache_info.json")):
    raise ConfigError(f"data.token_cache.path={path!r} has no cache_info.json, so it is not a "
                      f"finished token cache. {fix}")


def validate_common(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int) -> tuple[int, ...]:
  """Check the fields every model shares; return the resolved mesh shape."""
  mesh_shape = sharding_lib.resolve_mesh_shape(
      {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
      num_devices)
  sharding_lib.rules_dict(config.mesh.axis_rules)

  check_batch(config.train.batch_size, mesh_shape, num_processes, "train.batch_size")
  check_batch(config.eval.batch_size, mesh_shape, 1, "eval.batch_size")
  check_positive(config, ("train.num_steps", "train.log_every", "train.checkpoint_every",
                          "train.keep_checkpoints", "data.frame_stride", "data.height",
                          "data.width"))

  data = config.data
  for name in (data.source, *data.eval_sources):
    if name not in DATA_SOURCES:
      raise ConfigError(f"data source {name!r} is unknown; use one of {DATA_SOURCES}.")
  if "token_cache" in (data.source, *data.eval_sources):
    check_token_cache_path(data)
  if data.on_bad_video not in ("skip", "raise"):
    raise ConfigError(f"data.on_bad_video={data.on_bad_video!r}; use 'skip' or 'raise'.")
  if config.optimizer.ema_decay < 0 or config.optimizer.ema_decay >= 1:
    raise ConfigError(f"optimizer.ema_decay={config.optimizer.ema_decay} must be in [0, 1).")
  return mesh_shape
