"""Causal 3D convolution layers of the MAGVIT-v2-style tokenizer.

All layers take and return videos laid out as (batch, time, height, width, channels). Each keeps
the causal property in time: an output frame depends only on input frames at or before it (after
the index map of a temporal down- or upsampling). So the first frame of a video, and an image
passed as a one-frame video, are processed alone.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import tokdiff  # noqa: F401  (sets flax's variable-sharding flag before parameters are created)

# Logical axis names of a conv kernel laid out as (kt, kh, kw, cin, cout).
CONV_KERNEL_AXES = (None, None, None, "conv_in", "conv_out")

TIME_PADDING_MODES = ("zeros", "replicate")

# "stacked_2d" concatenates the kt input frames of each output frame along channels and runs
# one 2D conv. "conv3d" calls XLA's 3D convolution. Both compute the same function.
CONV_IMPLEMENTATIONS = ("stacked_2d", "conv3d")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """Return the (low, high) padding that gives ceil(size / stride) outputs, as TF's SAME does."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _time_stacked_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
                       spatial_padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """Run a 3D conv (VALID in time) as a 2D conv over frames stacked along channels."""
  batch, padded_frames, height, width, in_features = x.shape
  kt, kh, kw, _, out_features = kernel.shape
  st, sh, sw = strides
  out_frames = (padded_frames - kt) // st + 1

  # Output frame j reads padded frames j*st .. j*st + kt - 1, and tap i is frame j*st + i.
  taps = [x[:, i:i + st * (out_frames - 1) + 1:st] for i in range(kt)]
  stacked = jnp.concatenate(taps, axis=-1).reshape(batch * out_frames, height, width,
                                                   kt * in_features)
  kernel_2d = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * in_features, out_features)

  y = jax.lax.conv_general_dilated(stacked, kernel_2d, window_strides=(sh, sw),
                                   padding=spatial_padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y.reshape(batch, out_frames, *y.shape[1:])


class CausalConv3d(nnx.Module):
  """3D convolution padded only on the past side in time and SAME-padded in space.

  With temporal kernel kt and stride st, output frame j reads input frames j*st - kt + 1 .. j*st,
  so T input frames give (T - 1) // st + 1 output frames. Missing past frames are zeros or copies
  of the first frame (`time_padding`).

  The default conv_implementation, "stacked_2d", was 3 to 10 times faster than XLA's 3D conv on a
  2-core AVX-512 CPU (jax 0.10.2, batch 8 of 9x64x64 frames, 3 to 32 channels). It keeps kt
  copies of the input for the backward pass, so "conv3d" may suit accelerators short of memory.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: Sequence[int] = (3, 3, 3), *, strides: Sequence[int] = (1, 1, 1),
               time_padding: str = "zeros", conv_implementation: str = "stacked_2d",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if len(kernel_size) != 3 or len(strides) != 3:
      raise ValueError(f"kernel_size={kernel_size} and strides={strides} must both have 3 "
                       "entries (time, height, width).")
    if time_padding not in TIME_PADDING_MODES:
      raise ValueError(f"time_padding={time_padding!r} is invalid; use one of "
                       f"{TIME_PADDING_MODES}.")
    if conv_implementation not in CONV_IMPLEMENTATIONS:
      raise ValueError(f"conv_implementation={conv_implementation!r} is invalid; use one of "
                       f"{CONV_IMPLEMENTATIONS}.")
    self.kernel_size = tuple(kernel_size)
    self.strides = tuple(strides)
    self.time_padding = time_padding
    self.conv_implementation = conv_implementation
    self.dtype = dtype

    kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_KERNEL_AXES)
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (*self.kernel_size, in_features, out_features), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kh, kw = self.kernel_size
    st, sh, sw = self.strides

    # Pad kt - 1 frames on the past side only, so no output frame reads a later input frame.
    mode = "constant" if self.time_padding == "zeros" else "edge"
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)), mode=mode)

    kernel = self.kernel[...].astype(self.dtype)
    spatial_padding = (_same_padding(x.shape[2], kh, sh), _same_padding(x.shape[3], kw, sw))
    if self.conv_implementation == "stacked_2d":
      y = _time_stacked_conv(x, kernel, self.strides, spatial_padding)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(st, sh, sw), padding=((0, 0), *spatial_padding),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(self.dtype)


class FrameGroupNorm(nnx.Module):
  """Group normalisation with statistics per frame, over (height, width, channel group).

  Statistics never mix frames, because a norm over time would let later frames change earlier
  outputs and break causality. Statistics are computed in float32.
  """

  def __init__(self, num_features: int, num_groups: int, *, epsilon: float = 1e-6,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if num_groups < 1 or num_features % num_groups:
      raise ValueError(f"num_groups={num_groups} must be positive and divide the "
                       f"{num_features} channels; choose a divisor of {num_features}.")
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype

    scale_init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
    bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))
    self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), (num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    *lead, channels = x.shape
    grouped = x.astype(jnp.float32).reshape(*lead, self.num_groups, channels // self.num_groups)

    # Reduce over height, width and the channels within a group. Batch, time and group stay
    # separate.
    axes = (-4, -3, -1)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.var(grouped, axis=axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (normed * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResBlock(nnx.Module):
  """Pre-activation residual block: (norm, swish, causal 3x3x3 conv) twice, plus a skip path."""

  def __init__(self, in_features: int, out_features: int, *, num_groups: int,
               time_padding: str = "zeros", conv_implementation: str = "stacked_2d",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    conv = dict(time_padding=time_padding, conv_implementation=conv_implementation, dtype=dtype,
                rngs=rngs)
    self.norm1 = FrameGroupNorm(in_features, num_groups, dtype=dtype, rngs=rngs)
    self.conv1 = CausalConv3d(in_features, out_features, **conv)
    self.norm2 = FrameGroupNorm(out_features, num_groups, dtype=dtype, rngs=rngs)
    self.conv2 = CausalConv3d(out_features, out_features, **conv)

    # The skip path is the identity unless the width changes, which needs a 1x1x1 projection.
    self.skip = (CausalConv3d(in_features, out_features, (1, 1, 1), **conv)
                 if in_features != out_features else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    skip = x if self.skip is None else self.skip(x)
    return skip + h


class Downsample(nnx.Module):
  """Causal 3x3x3 conv with stride 2 in space and/or time, where enabled.

  In time it pads 2 past frames with stride 2, which maps 1 + 2m frames to 1 + m, and output
  frame i reads input frames 2i - 2 .. 2i.
  """

  def __init__(self, in_features: int, out_features: int, *, temporal: bool, spatial: bool,
               time_padding: str = "zeros", conv_implementation: str = "stacked_2d",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.temporal_factor = 2 if temporal else 1
    self.spatial_factor = 2 if spatial else 1
    strides = (self.temporal_factor, self.spatial_factor, self.spatial_factor)
    self.conv = CausalConv3d(in_features, out_features, strides=strides,
                             time_padding=time_padding, conv_implementation=conv_implementation,
                             dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


def depth_to_space_time(x: jax.Array, temporal_factor: int, spatial_factor: int) -> jax.Array:
  """Move channel blocks into time and space: (B, T, H, W, ft*fs*fs*C) -> (B, ft*T, fs*H, fs*W, C).

  Each input frame t becomes output frames ft*t .. ft*t + ft - 1, so the map stays causal.
  """
  batch, frames, height, width, channels = x.shape
  ft, fs = temporal_factor, spatial_factor
  if channels % (ft * fs * fs):
    raise ValueError(f"{channels} channels do not split into {ft}x{fs}x{fs} blocks.")
  out_channels = channels // (ft * fs * fs)

  x = x.reshape(batch, frames, height, width, ft, fs, fs, out_channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(batch, frames * ft, height * fs, width * fs, out_channels)


class Upsample(nnx.Module):
  """Causal 3x3x3 conv to ft*fs*fs times the channels, then depth-to-space and depth-to-time.

  In time, 1 + m frames become 2 + 2m, and the first one is dropped to give 1 + 2m. Output frame
  j then comes from input frame (j + 1) // 2, so frame 0 still depends on frame 0 alone.
  """

  def __init__(self, in_features: int, out_features: int, *, temporal: bool, spatial: bool,
               time_padding: str = "zeros", conv_implementation: str = "stacked_2d",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.temporal_factor = 2 if temporal else 1
    self.spatial_factor = 2 if spatial else 1
    expansion = self.temporal_factor * self.spatial_factor ** 2
    self.conv = CausalConv3d(in_features, out_features * expansion,
                             time_padding=time_padding, conv_implementation=conv_implementation,
                             dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = depth_to_space_time(self.conv(x), self.temporal_factor, self.spatial_factor)
    return x[:, self.temporal_factor - 1:]
