"""Shared parts of the MaskGIT and WALT tasks: the token cache, sample decoding and evaluation.

Both generators train on one token cache written by `launch.tokenize`. The cache info fixes the
token grid (t, h, w), the bits K per token and the number of classes. Samples are decoded to video
by the tokenizer that wrote the cache, so both models are judged through the same decoder.
`GeneratorTask` implements the parts of the trainer's `Task` protocol that do not depend on the
model: validation of the data section, the evaluation loop, timing, decoding and the sample GIF.
"""

import abc
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from magvit import inference
from tokdiff import sharding as sharding_lib
from tokdiff import task as task_lib
from tokdiff import validation
from tokdiff import video_io
from tokdiff.data import token_cache
from tokdiff.sharding import ConfigError

# Seed of the per-clip keys of the evaluation loss. It is fixed so that the loss of different
# checkpoints is measured with the same masks, noise and times.
EVAL_LOSS_SEED = 0

# Columns of the sample grid GIF. Further samples continue on the next rows.
GRID_COLUMNS = 8


def class_cycle_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Return int32 labels 0, 1, ..., num_classes - 1, 0, 1, ... of length num_samples."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def sample_grid(videos: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
  """Tile videos (N, T, H, W, C) into one video with `columns` samples per row.

  A last row with fewer samples is filled with black videos.

  Returns:
    Array (T, rows * H, columns * W, C) with rows = ceil(N / columns), or (T, H, N * W, C) when
    N < columns.
  """
  columns = min(columns, videos.shape[0])
  rows = -(-videos.shape[0] // columns)
  padding = rows * columns - videos.shape[0]
  if padding:
    videos = np.concatenate([videos, np.zeros((padding,) + videos.shape[1:], videos.dtype)])
  return video_io.stack_rows([videos[row * columns:(row + 1) * columns] for row in range(rows)])


def config_value(config: ml_collections.ConfigDict, field: str):
  """Return the value of a dotted field name such as 'loss.label_dropout'."""
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def check_probabilities(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> None:
  """Raise ConfigError unless every named field lies in [0, 1]."""
  for field in fields:
    value = config_value(config, field)
    if not 0.0 <= value <= 1.0:
      raise ConfigError(f"{field}={value} is not a probability. Use a value in [0, 1].")


def check_sampling(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for sampler settings that no generator accepts."""
  sampling = config.sampling
  if sampling.num_steps < 1:
    raise ConfigError(f"sampling.num_steps={sampling.num_steps} must be at least 1.")
  if sampling.guidance_scale < 0:
    raise ConfigError(f"sampling.guidance_scale={sampling.guidance_scale} must be at least 0 "
                      "(0 is unconditional, 1 is plain conditional sampling).")


def _gather(array: jax.Array) -> np.ndarray:
  """Copy a (possibly sharded, possibly multi-process) array to a host numpy array."""
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _compile_and_run(jitted, *args) -> tuple[Any, float, float]:
  """Compile `jitted` for `args`, run it and return (outputs, compile seconds, run seconds).

  Compiling first keeps compilation out of the measured run time. jax.jit (0.10.2, checked with
  jax_log_compiles) reuses that executable for the call, so nothing is compiled twice.
  """
  start = time.perf_counter()
  jitted.lower(*args).compile()
  compiled = time.perf_counter()
  outputs = jax.block_until_ready(jitted(*args))
  return outputs, compiled - start, time.perf_counter() - compiled


class GeneratorTask(abc.ABC):
  """Trainer task of a class-conditional generator over a token cache.

  Subclasses supply the model, its loss, its sampler and the mapping from sampler outputs to the
  +-1 codes the tokenizer decodes. The cache info is read once, on first use, and the tokenizer
  is loaded once, on the first evaluation or `generate` call.
  """

  family: str = ""
  # Batch entries the loss reads. Evaluation sends only these to the devices.
  batch_fields: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, *,
               cache_info: dict[str, Any] | None = None, tokenizer=None):
    """Create the task.

    Args:
      config: the full run config.
      cache_info: the cache info to use in place of reading `config.data.token_cache.path`
        (for in-memory tests and for callers that have read it already).
      tokenizer: a tokenizer already checked against the cache, or None to load the cache's
        tokenizer checkpoint (and check its fingerprint) when it is first needed.
    """
    self.config = config
    self._cache_info = cache_info
    self._tokenizer = tokenizer
    self._tokenizer_split = None
    # graphdef is static, so each jitted function compiles once per model structure and shape.
    self._sample_jit = jax.jit(self._sample_pure, static_argnums=0)
    self._clip_loss_jit = jax.jit(self._clip_losses_pure, static_argnums=0)
    self._decode_jit = jax.jit(self._decode_pure, static_argnums=0)

  # --- What a model family supplies. ---

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model from explicit config fields and the cache's shapes."""

  @abc.abstractmethod
  def model_loss(self, model: nnx.Module, batch: task_lib.Batch, rng: jax.Array, *,
                 train: bool) -> tuple[jax.Array, task_lib.Metrics]:
    """Compute the loss and metrics. `train=False` turns off dropout and label dropout."""

  @abc.abstractmethod
  def sample_outputs(self, model: nnx.Module, labels: jax.Array, rng: jax.Array) -> jax.Array:
    """Sample token grids or latents for `labels` (traceable, runs under jit)."""

  @abc.abstractmethod
  def outputs_to_codes(self, outputs: np.ndarray) -> np.ndarray:
    """Map sampler outputs on the host to +-1 codes (N, t, h, w, K) for the decoder."""

  @abc.abstractmethod
  def validate_model(self, info: dict[str, Any]) -> None:
    """Raise ConfigError for model, loss or sampling fields that cannot work with `info`."""

  @property
  @abc.abstractmethod
  def sampling_steps(self) -> int:
    """Number of sampler steps per sample: decoding steps (MaskGIT) or DDIM steps (WALT)."""

  # --- The cache and the tokenizer. ---

  @property
  def cache_info(self) -> dict[str, Any]:
    """Cache info of `config.data.token_cache.path`, read on first use."""
    if self._cache_info is None:
      self._cache_info = token_cache.read_cache_info(self.config.data.token_cache.path)
    return self._cache_info

  @property
  def token_shape(self) -> tuple[int, int, int]:
    """Token grid (t, h, w) of one clip."""
    return tuple(int(size) for size in self.cache_info["token_shape"])

  @property
  def tokenizer(self):
    """The cache's tokenizer, loaded and checked on first use."""
    if self._tokenizer is None:
      self._tokenizer, _ = token_cache.load_cache_tokenizer(self.cache_info)
    return self._tokenizer

  # --- Task protocol. ---

  def validate(self) -> None:
    """Raise ConfigError for settings that cannot work, before anything is compiled."""
    data = self.config.data
    if data.source != "token_cache" or any(name != "token_cache" for name in data.eval_sources):
      raise ConfigError(
          f"data.source={data.source!r} and data.eval_sources={tuple(data.eval_sources)} are "
          f"invalid because the {self.family} generator trains and evaluates on a token cache. "
          "Set --config.data.source=token_cache and "
          "--config.data.eval_sources=\"('token_cache',)\".")
    if self._cache_info is None:
      validation.check_token_cache_path(data)

    if self.config.eval.num_samples < 1:
      raise ConfigError(f"eval.num_samples={self.config.eval.num_samples} must be at least 1.")
    validation.check_positive(self.config, ("model.embed_dim", "model.depth", "model.num_heads",
                                            "model.mlp_dim"))
    model = self.config.model
    if model.embed_dim % model.num_heads:
      raise ConfigError(f"model.embed_dim={model.embed_dim} is not divisible by "
                        f"model.num_heads={model.num_heads}. Pick a head count that divides it.")
    check_sampling(self.config)

    try:
      info = self.cache_info
    except token_cache.CacheError as error:
      raise ConfigError(f"data.token_cache.path: {error}") from error
    if int(info["num_classes"]) < 1:
      raise ConfigError(
          f"the token cache at {data.token_cache.path!r} has num_classes={info['num_classes']}, "
          "but class-conditional training needs at least one class. Tokenize a labelled source.")
    self.validate_model(info)

  def loss_fn(self, model: nnx.Module, batch: task_lib.Batch,
              rng: jax.Array) -> tuple[jax.Array, task_lib.Metrics]:
    """Return the training loss and metrics of one batch."""
    return self.model_loss(model, batch, rng, train=True)

  def evaluate(self, model: nnx.Module, context: task_lib.EvalContext) -> dict[str, float]:
    """Compute the eval loss per source, sample and decode videos, and write them as a GIF.

    Returns:
      `<source>/loss` (mean over the real clips of each source), `sampling_seconds_per_video`
      and `decode_seconds_per_video` (run time without compilation).
    """
    results = {}
    for source, batches in context.eval_batches.items():
      results[f"{source}/loss"] = self.eval_loss(model, batches, context.mesh)

    graphdef, state = nnx.split(model)

    num_samples = self.config.eval.num_samples
    labels = class_cycle_labels(num_samples, int(self.cache_info["num_classes"]))
    rng = jax.random.key(self.config.seed)
    outputs, compile_s, sample_s = _compile_and_run(self._sample_jit, graphdef, state, labels,
                                                    rng)
    videos, decode_s = self._decode_timed(_gather(outputs))
    print(f"{self.family} sampling: {num_samples} videos, {self.sampling_steps} steps, compiled "
          f"in {compile_s:.1f} s, ran in {sample_s:.2f} s, decoded in {decode_s:.2f} s.",
          flush=True)

    path = context.writer.write_gif(context.step, f"samples/{self.family}", sample_grid(videos),
                                    fps=self.config.eval.gif_fps)
    if path:
      print(f"{self.family} samples (labels {labels.tolist()}, row-major): {path}", flush=True)
    results["sampling_seconds_per_video"] = sample_s / num_samples
    results["decode_seconds_per_video"] = decode_s / num_samples
    return results

  def generate(self, model: nnx.Module, labels, rng: jax.Array) -> np.ndarray:
    """Sample one video per label with the configured steps and guidance.

    Args:
      model: the generator (usually with EMA parameters).
      labels: int class labels (N,).
      rng: PRNG key.

    Returns:
      uint8 videos (N, T, H, W, 3), decoded by the cache's tokenizer.
    """
    graphdef, state = nnx.split(model)
    outputs = self._sample_jit(graphdef, state, np.asarray(labels, np.int32), rng)
    videos, _ = self._decode_timed(_gather(outputs))
    return videos

  def eval_loss(self, model: nnx.Module, batches: list[dict[str, np.ndarray]],
                mesh: jax.sharding.Mesh) -> float:
    """Compute the mean loss over the real clips (mask True) of host eval batches.

    Each clip gets its own key, derived from EVAL_LOSS_SEED and its position in `batches`, so
    the result does not depend on the padding rows, and on the batch size only through float
    rounding.
    """
    graphdef, state = nnx.split(model)
    total, count, offset = 0.0, 0, 0
    for batch in batches:
      size = len(batch["label"])
      device_batch = {name: sharding_lib.host_to_global(batch[name], mesh)
                      for name in self.batch_fields}
      indices = sharding_lib.host_to_global(np.arange(offset, offset + size, dtype=np.int32),
                                            mesh)
      losses = _gather(self._clip_loss_jit(graphdef, state, device_batch, indices))
      keep = np.asarray(batch["mask"], bool)
      total += float(np.sum(losses[keep]))
      count += int(np.sum(keep))
      offset += size
    if not count:
      raise ValueError("the eval batches contain no real clips (every mask entry is False).")
    return total / count

  # --- Jitted pieces. ---

  def _sample_pure(self, graphdef, state, labels, rng):
    return self.sample_outputs(nnx.merge(graphdef, state), labels, rng)

  def _clip_losses_pure(self, graphdef, state, batch, clip_indices):
    """Return the eval loss of each clip (B,), each with its own key from its clip index."""
    model = nnx.merge(graphdef, state)
    base_key = jax.random.key(EVAL_LOSS_SEED)

    def clip_loss(example, clip_index):
      single = jax.tree.map(lambda value: value[None], example)
      loss, _ = self.model_loss(model, single, jax.random.fold_in(base_key, clip_index),
                                train=False)
      return loss

    return jax.vmap(clip_loss)(batch, clip_indices)

  def _decode_pure(self, graphdef, state, codes):
    return nnx.merge(graphdef, state).decode(codes)

  def _decode_timed(self, outputs: np.ndarray) -> tuple[np.ndarray, float]:
    """Decode sampler outputs to uint8 videos and return them with the run time in seconds."""
    if self._tokenizer_split is None:
      self._tokenizer_split = nnx.split(self.tokenizer)
    graphdef, state = self._tokenizer_split
    # NOTE: `load_tokenizer` places the tokenizer on jax.devices()[0], so decoding is not split
    # over the mesh, and evaluation with several processes has not been run.
    codes = jnp.asarray(self.outputs_to_codes(outputs), jnp.float32)
    videos, _, run_s = _compile_and_run(self._decode_jit, graphdef, state, codes)
    return inference.to_uint8(np.asarray(videos)), run_s
