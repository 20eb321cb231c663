"""Token cache: one tokenizer's token ids and latents for every clip of a dataset.

`python -m launch.tokenize` writes the cache once, and MaskGIT and WALT then train on the same
tokens without running the tokenizer encoder again. Layout of a cache folder:

  cache_info.json              what built the cache and the shapes it contains
  train/records.array_record   one record per clip, written with group_size:1
  eval/records.array_record

Each record is a msgpack map (flax.serialization) with `tokens` int32 (t, h, w), `latents`
float32 (t, h, w, K), `label` int and `clip_id` str.
A token id's bit k is 1 where latent channel k is +1 (see magvit/lfq.py). The latents are what
the diffusion model trains on: with latent_kind 'lfq' they are the +-1 codes of the tokens, and
with 'continuous' they are the encoder outputs z before quantization, normalised per channel with
the train split's mean and standard deviation.
"""

from __future__ import annotations

import json
import os
from typing import Any

from array_record.python import array_record_module
import grain.python as grain
from flax import serialization
import jax.numpy as jnp
import numpy as np

CACHE_INFO_NAME = "cache_info.json"
RECORD_FILE_NAME = "records.array_record"
FORMAT_VERSION = 2
LATENT_KINDS = ("lfq", "continuous")
SPLITS = ("train", "eval")

# Floor for a channel's standard deviation, so a constant channel does not divide by zero.
MIN_STD = 1e-6

REQUIRED_INFO_KEYS = (
    "format_version", "tokenizer_workdir", "checkpoint_step", "tokenizer_fingerprint",
    "latent_kind", "latent_stats", "token_shape", "latent_bits", "num_classes", "num_clips",
    "record_files",
)

_REBUILD_HINT = ("Build the cache with `python -m launch.tokenize --workdir=TOKENIZER_DIR "
                 "--output=CACHE_DIR`.")


class CacheError(ValueError):
  """A token cache that is missing, incomplete, corrupt or of an unsupported format."""


class TokenizerMismatchError(CacheError):
  """A tokenizer whose parameters differ from the ones that built the cache."""


# ---------------------------------------------------------------------------------------------
# Records


def serialize_record(tokens: np.ndarray, latents: np.ndarray, label: int, clip_id: str) -> bytes:
  """Pack one clip's record as msgpack (flax.serialization; arrays keep dtype and shape)."""
  return serialization.msgpack_serialize({
      "tokens": np.asarray(tokens, np.int32),
      "latents": np.asarray(latents, np.float32),
      "label": int(label),
      "clip_id": str(clip_id),
  })


def deserialize_record(data: bytes) -> dict[str, Any]:
  """Unpack `serialize_record` bytes into tokens, latents, label (int) and clip_id (str).

  msgpack, unlike `np.load`, parses no Python literals, so grain's reader threads can decode
  records in parallel: on CPython 3.11, concurrent `np.load` header parsing through
  `ast.literal_eval` raised "SystemError: AST constructor recursion depth mismatch" here.
  """
  record = serialization.msgpack_restore(data)
  return {
      "tokens": np.asarray(record["tokens"]),
      "latents": np.asarray(record["latents"]),
      "label": int(record["label"]),
      "clip_id": str(record["clip_id"]),
  }


class SplitWriter:
  """Appends records of one split to `<split_folder>/records.array_record`.

  Use it as a context manager, or call `close()`, so the file's footer gets written.
  """

  def __init__(self, split_folder: str | os.PathLike):
    os.makedirs(split_folder, exist_ok=True)
    self.path = os.path.join(split_folder, RECORD_FILE_NAME)
    # Grain reads single records at random positions, which group_size:1 keeps cheap.
    self._writer = array_record_module.ArrayRecordWriter(self.path, "group_size:1")
    self.num_records = 0

  def write(self, tokens: np.ndarray, latents: np.ndarray, label: int, clip_id: str) -> None:
    self._writer.write(serialize_record(tokens, latents, label, clip_id))
    self.num_records += 1

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> SplitWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_split_records(path: str | os.PathLike) -> grain.ArrayRecordDataSource:
  """Open one ArrayRecord file of serialized records for random access."""
  return grain.ArrayRecordDataSource([os.fspath(path)])


# ---------------------------------------------------------------------------------------------
# Cache info


def write_cache_info(path: str | os.PathLike, info: dict[str, Any]) -> None:
  """Write cache_info.json through a temporary file, so readers never see half of it."""
  target = os.path.join(path, CACHE_INFO_NAME)
  temporary = target + ".tmp"
  with open(temporary, "w", encoding="utf-8") as file:
    json.dump(info, file, indent=2, sort_keys=True)
  os.replace(temporary, target)


def read_cache_info(path: str | os.PathLike) -> dict[str, Any]:
  """Read and check a cache's cache_info.json.

  Returns:
    The stored dict (keys listed in REQUIRED_INFO_KEYS and more, see `tokdiff.data.cache_builder`) with
    `path` added: the cache folder as an absolute path.

  Raises:
    CacheError: the folder or its cache_info.json is missing, unreadable or incomplete.
  """
  path = os.path.abspath(os.fspath(path))
  info_path = os.path.join(path, CACHE_INFO_NAME)
  if not os.path.isdir(path):
    raise CacheError(f"Token cache folder {path} does not exist. {_REBUILD_HINT}")
  if not os.path.isfile(info_path):
    raise CacheError(
        f"Token cache {path} has no {CACHE_INFO_NAME}. launch.tokenize writes it last, so the "
        f"cache build did not finish or the path is wrong. {_REBUILD_HINT}")

  try:
    with open(info_path, encoding="utf-8") as file:
      info = json.load(file)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise CacheError(f"{info_path} is corrupt ({error}). Delete the cache and rebuild it. "
                     f"{_REBUILD_HINT}") from error

  if not isinstance(info, dict):
    raise CacheError(f"{info_path} is corrupt: it contains a {type(info).__name__}, not a JSON "
                     f"object. Delete the cache and rebuild it. {_REBUILD_HINT}")
  missing = [key for key in REQUIRED_INFO_KEYS if key not in info]
  if missing:
    raise CacheError(f"{info_path} is corrupt: keys {missing} are missing. Delete the cache "
                     f"and rebuild it. {_REBUILD_HINT}")
  if info["format_version"] != FORMAT_VERSION:
    raise CacheError(f"{info_path} has format_version {info['format_version']}, but this code "
                     f"reads version {FORMAT_VERSION}. {_REBUILD_HINT}")
  if info["latent_kind"] not in LATENT_KINDS:
    raise CacheError(f"{info_path} has latent_kind {info['latent_kind']!r}; expected one of "
                     f"{LATENT_KINDS}. {_REBUILD_HINT}")
  info["path"] = path
  return info


def check_tokenizer(info: dict[str, Any], tokenizer) -> None:
  """Raise TokenizerMismatchError unless `tokenizer` has the parameters that built the cache.

  Args:
    info: the dict from `read_cache_info`.
    tokenizer: a magvit Tokenizer, e.g. from `magvit.inference.load_tokenizer`.
  """
  # Imported here because magvit imports tokdiff, and this module is part of tokdiff.
  from magvit import inference  # pylint: disable=import-outside-toplevel

  fingerprint = inference.tokenizer_fingerprint(tokenizer)
  expected = info["tokenizer_fingerprint"]
  if fingerprint == expected:
    return
  raise TokenizerMismatchError(
      f"The tokenizer does not match token cache {info.get('path', '<unknown path>')}: the cache "
      f"was built with tokenizer fingerprint {expected} (workdir {info['tokenizer_workdir']}, "
      f"checkpoint step {info['checkpoint_step']}), but this tokenizer has fingerprint "
      f"{fingerprint}. Load that checkpoint step, or rebuild the cache with this tokenizer: "
      f"`python -m launch.tokenize --workdir=TOKENIZER_DIR --output=CACHE_DIR`.")


def load_cache_tokenizer(info: dict[str, Any]):
  """Load the tokenizer checkpoint that built the cache and check its fingerprint.

  Returns:
    (tokenizer, config) as `magvit.inference.load_tokenizer` returns them.
  """
  from magvit import inference  # pylint: disable=import-outside-toplevel

  tokenizer, config = inference.load_tokenizer(info["tokenizer_workdir"], info["checkpoint_step"])
  check_tokenizer(info, tokenizer)
  return tokenizer, config


# ---------------------------------------------------------------------------------------------
# Latents


class RunningMoments:
  """Per-channel mean and variance over batches of latents (..., K), merged in float64."""

  def __init__(self, num_channels: int):
    self.count = 0
    self.mean = np.zeros(num_channels, np.float64)
    self._sum_squares = np.zeros(num_channels, np.float64)  # sum of squared deviations

  def update(self, latents: np.ndarray) -> None:
    flat = np.asarray(latents, np.float64).reshape(-1, self.mean.shape[0])
    if not flat.shape[0]:
      return
    batch_mean = flat.mean(axis=0)
    batch_sum_squares = np.square(flat - batch_mean).sum(axis=0)

    # The pairwise (parallel) variance update, which stays accurate when the mean is large.
    total = self.count + flat.shape[0]
    delta = batch_mean - self.mean
    self.mean = self.mean + delta * (flat.shape[0] / total)
    self._sum_squares += batch_sum_squares + np.square(delta) * (self.count * flat.shape[0] / total)
    self.count = total

  def stats(self) -> dict[str, list[float]]:
    """Return {'mean': [K], 'std': [K]}, with each std floored at MIN_STD."""
    if not self.count:
      raise ValueError("No latents were added, so there are no statistics to compute.")
    std = np.maximum(np.sqrt(self._sum_squares / self.count), MIN_STD)
    return {"mean": self.mean.tolist(), "std": std.tolist()}


def _stat_arrays(info: dict[str, Any]) -> tuple[jnp.ndarray, jnp.ndarray]:
  stats = info["latent_stats"]
  if not stats:
    raise CacheError(f"Token cache {info.get('path', '')} has latent_kind 'continuous' but no "
                     f"latent_stats. {_REBUILD_HINT}")
  return jnp.asarray(stats["mean"], jnp.float32), jnp.asarray(stats["std"], jnp.float32)


def normalize(z, info: dict[str, Any]) -> jnp.ndarray:
  """Map encoder latents z (..., K) to the cache's latents (identity for 'lfq' caches)."""
  if info["latent_kind"] == "lfq":
    return jnp.asarray(z, jnp.float32)
  mean, std = _stat_arrays(info)
  return (jnp.asarray(z, jnp.float32) - mean) / std


def denormalize(latents, info: dict[str, Any]) -> jnp.ndarray:
  """Map cache latents (..., K) back to the encoder's scale (identity for 'lfq' caches)."""
  if info["latent_kind"] == "lfq":
    return jnp.asarray(latents, jnp.float32)
  mean, std = _stat_arrays(info)
  return jnp.asarray(latents, jnp.float32) * std + mean


def latents_to_codes(latents, info: dict[str, Any]) -> jnp.ndarray:
  """Map latents (..., K), e.g. a diffusion model's samples, to the +-1 codes the decoder takes.

  Continuous latents are denormalised first. A channel becomes +1 where it is >= 0, the same
  rule as the quantizer's, so this works under jit and returns float32 of the input's shape.
  """
  latents = jnp.asarray(latents, jnp.float32)
  if latents.shape[-1] != info["latent_bits"]:
    raise ValueError(f"latents have shape {latents.shape}, but the cache's tokenizer has "
                     f"latent_bits={info['latent_bits']} channels in the last axis.")
  return jnp.where(denormalize(latents, info) >= 0, 1.0, -1.0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Reading


class TokenCacheSource:
  """Random-access source (grain style) of one split of a token cache.

  Records are dicts with `tokens`, `latents`, `label` and `clip_id` (see the module docstring).
  """

  def __init__(self, path: str | os.PathLike, split: str):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    self.info = read_cache_info(path)
    self.path = self.info["path"]
    self.split = split
    if split not in self.info["num_clips"]:
      raise CacheError(
          f"Token cache {self.path} has no {split!r} split (it has "
          f"{sorted(self.info['num_clips'])}). Rebuild it with `python -m launch.tokenize "
          "--splits=train,eval`.")

    files = [os.path.join(self.path, split, name) for name in self.info["record_files"][split]]
    for file in files:
      if not os.path.isfile(file):
        raise CacheError(f"Token cache file {file} is missing. {_REBUILD_HINT}")
    self._records = grain.ArrayRecordDataSource(files)

    expected = self.info["num_clips"][split]
    if len(self._records) != expected:
      raise CacheError(f"The {split} split of token cache {self.path} has {len(self._records)} "
                       f"records, but {CACHE_INFO_NAME} lists {expected}. {_REBUILD_HINT}")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return deserialize_record(self._records[int(index)])

  def __repr__(self) -> str:
    # grain compares this text when restoring an iterator state, so it must be stable.
    return (f"TokenCacheSource(path={self.path!r}, split={self.split!r}, "
            f"num_records={len(self)}, tokenizer_fingerprint="
            f"{self.info['tokenizer_fingerprint']!r}, latent_kind={self.info['latent_kind']!r})")


class TrainElement(grain.MapTransform):
  """Keep the fields a generator trains on: tokens, latents and label (clip ids stay behind)."""

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "tokens": element["tokens"],
        "latents": element["latents"],
        "label": np.int32(element["label"]),
    }


def eval_batches(path: str | os.PathLike, *, batch_size: int,
                 max_batches: int | None) -> list[dict[str, np.ndarray]]:
  """Build the evaluation batches of a cache's eval split, in record order.

  Returns:
    A list of dicts with `tokens` int32 (batch_size, t, h, w), `latents` float32
    (batch_size, t, h, w, K), `label` int32, `clip_id` str and `mask` bool, each (batch_size,).
    The last batch is padded by repeating its records, and `mask` is False on the padding.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  source = TokenCacheSource(path, "eval")
  num_records = len(source)
  if max_batches is not None:
    num_records = min(num_records, batch_size * max_batches)
  if not num_records:
    raise CacheError(f"The eval split of token cache {source.path} is empty.")

  records = [source[index] for index in range(num_records)]
  return [_pad_batch(records[start:start + batch_size], batch_size)
          for start in range(0, num_records, batch_size)]


def _pad_batch(records: list[dict[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
  padded = [records[index % len(records)] for index in range(batch_size)]
  return {
      "tokens": np.stack([record["tokens"] for record in padded]).astype(np.int32),
      "latents": np.stack([record["latents"] for record in padded]).astype(np.float32),
      "label": np.asarray([record["label"] for record in padded], np.int32),
      "clip_id": np.asarray([record["clip_id"] for record in padded]),
      "mask": np.arange(batch_size) < len(records),
  }
