"""Causal 3D CNN encoder and decoder, and the LFQ video tokenizer built from them.

Videos are float arrays (B, T, H, W, C) in [-1, 1]. With total temporal factor f and spatial
factor s, 1 + f*k frames of H x W give latents (B, 1 + k, H/s, W/s, K). The first frame is encoded
on its own, so an image (T = 1) encodes exactly like the first frame of a video.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import tokdiff  # noqa: F401  (sets flax's variable-sharding flag before parameters are created)
from magvit import layers
from magvit import lfq


def valid_num_frames(num_frames: int, temporal_factor: int) -> bool:
  """Return whether a clip of num_frames has the form 1 + temporal_factor * k, k >= 0."""
  return num_frames >= 1 and (num_frames - 1) % temporal_factor == 0


def nearest_valid_num_frames(num_frames: int, temporal_factor: int) -> int:
  """Return the frame count of the form 1 + temporal_factor * k closest to num_frames.

  A tie goes to the smaller count, because a clip of num_frames frames always contains it.
  """
  if temporal_factor < 1:
    raise ValueError(f"temporal_factor={temporal_factor} must be at least 1.")
  k_below = max(num_frames - 1, 0) // temporal_factor
  below, above = 1 + temporal_factor * k_below, 1 + temporal_factor * (k_below + 1)
  return below if num_frames - below <= above - num_frames else above


def _frame_count_error(num_frames: int, temporal_factor: int) -> str:
  below = 1 + temporal_factor * (max(num_frames - 1, 0) // temporal_factor)
  above = below + temporal_factor
  return (f"num_frames={num_frames} is not of the form 1+{temporal_factor}k; "
          f"use {below} or {above}.")


class Encoder(nnx.Module):
  """Causal 3D CNN from video (B, T, H, W, C) to continuous latents (B, T', H', W', K).

  Stage i runs `num_res_blocks` residual blocks at base_channels * channel_multipliers[i], then
  a strided conv that halves space where spatial_downsample[i] and time where
  temporal_downsample[i]. Residual blocks, a norm and a 1x1x1 conv to K channels follow.
  """

  def __init__(self, *, in_channels: int, base_channels: int,
               channel_multipliers: Sequence[int], num_res_blocks: int,
               temporal_downsample: Sequence[bool], spatial_downsample: Sequence[bool],
               latent_bits: int, num_groups: int, time_padding: str = "zeros",
               conv_implementation: str = "stacked_2d", dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    common = dict(time_padding=time_padding, conv_implementation=conv_implementation,
                  dtype=dtype, rngs=rngs)
    self.conv_in = layers.CausalConv3d(in_channels, base_channels, **common)

    blocks = []
    channels = base_channels
    for multiplier, temporal, spatial in zip(channel_multipliers, temporal_downsample,
                                             spatial_downsample, strict=True):
      width = base_channels * multiplier
      for _ in range(num_res_blocks):
        blocks.append(layers.ResBlock(channels, width, num_groups=num_groups, **common))
        channels = width
      blocks.append(layers.Downsample(channels, channels, temporal=temporal, spatial=spatial,
                                      **common))
    for _ in range(num_res_blocks):
      blocks.append(layers.ResBlock(channels, channels, num_groups=num_groups, **common))
    self.blocks = nnx.List(blocks)

    self.norm_out = layers.FrameGroupNorm(channels, num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = layers.CausalConv3d(channels, latent_bits, (1, 1, 1), **common)

  def __call__(self, video: jax.Array) -> jax.Array:
    x = self.conv_in(video)
    for block in self.blocks:
      x = block(x)
    z = self.conv_out(nnx.swish(self.norm_out(x)))
    return z.astype(jnp.float32)


class Decoder(nnx.Module):
  """Causal 3D CNN from latents (B, T', H', W', K) back to video (B, T, H, W, C).

  It mirrors the Encoder: residual blocks at the widest stage, then for each stage from the
  last to the first an upsampling (depth-to-space and depth-to-time) followed by
  `num_res_blocks` residual blocks, then a norm and a conv to C channels.
  """

  def __init__(self, *, out_channels: int, base_channels: int,
               channel_multipliers: Sequence[int], num_res_blocks: int,
               temporal_downsample: Sequence[bool], spatial_downsample: Sequence[bool],
               latent_bits: int, num_groups: int, time_padding: str = "zeros",
               conv_implementation: str = "stacked_2d", dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    common = dict(time_padding=time_padding, conv_implementation=conv_implementation,
                  dtype=dtype, rngs=rngs)
    channels = base_channels * channel_multipliers[-1]
    self.conv_in = layers.CausalConv3d(latent_bits, channels, **common)

    blocks = []
    for _ in range(num_res_blocks):
      blocks.append(layers.ResBlock(channels, channels, num_groups=num_groups, **common))
    stages = list(zip(channel_multipliers, temporal_downsample, spatial_downsample, strict=True))
    for multiplier, temporal, spatial in reversed(stages):
      width = base_channels * multiplier
      blocks.append(layers.Upsample(channels, width, temporal=temporal, spatial=spatial,
                                    **common))
      channels = width
      for _ in range(num_res_blocks):
        blocks.append(layers.ResBlock(channels, channels, num_groups=num_groups, **common))
    self.blocks = nnx.List(blocks)

    self.norm_out = layers.FrameGroupNorm(channels, num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = layers.CausalConv3d(channels, out_channels, **common)

  def __call__(self, latents: jax.Array) -> jax.Array:
    x = self.conv_in(latents)
    for block in self.blocks:
      x = block(x)
    video = self.conv_out(nnx.swish(self.norm_out(x)))
    return video.astype(jnp.float32)


class Tokenizer(nnx.Module):
  """MAGVIT-v2-style video tokenizer: causal encoder, lookup-free quantizer, causal decoder.

  Attributes:
    temporal_factor: frames per latent frame after the first (2 per temporal downsampling).
    spatial_factor: pixels per latent position along height and along width.
    codebook_size: number of token ids, 2 ** latent_bits.
  """

  def __init__(self, *, in_channels: int = 3, base_channels: int,
               channel_multipliers: Sequence[int] = (1, 2, 2), num_res_blocks: int,
               temporal_downsample: Sequence[bool] = (False, True, True),
               spatial_downsample: Sequence[bool] | None = None, latent_bits: int,
               num_groups: int, time_padding: str = "zeros", entropy_temperature: float = 0.01,
               exact_entropy_max_bits: int = 12, conv_implementation: str = "stacked_2d",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    """Build the tokenizer.

    Args:
      in_channels: channels of the input video (3 for RGB).
      base_channels: width of the first stage; stage i is base_channels * channel_multipliers[i].
      channel_multipliers: one width multiplier per stage.
      num_res_blocks: residual blocks per stage and in the middle of each network.
      temporal_downsample: per stage, whether it halves time (1 + 2m -> 1 + m frames).
      spatial_downsample: per stage, whether it halves height and width; None means every stage.
      latent_bits: K, latent channels and bits per token.
      num_groups: GroupNorm groups; must divide every stage width.
      time_padding: "zeros" or "replicate" (copies of the first frame) for past padding.
      entropy_temperature: softmax temperature of the LFQ entropy terms.
      exact_entropy_max_bits: largest K for which the entropy terms use all 2^K codes.
      conv_implementation: "stacked_2d" (fast on CPU) or "conv3d"; see layers.CausalConv3d.
      dtype: compute dtype of convolutions; norms, latents and outputs stay float32.
      rngs: random streams for parameter initialisation.
    """
    num_stages = len(channel_multipliers)
    if spatial_downsample is None:
      spatial_downsample = (True,) * num_stages
    if len(temporal_downsample) != num_stages or len(spatial_downsample) != num_stages:
      raise ValueError(
          f"temporal_downsample={tuple(temporal_downsample)} and spatial_downsample="
          f"{tuple(spatial_downsample)} need one entry per stage, as channel_multipliers="
          f"{tuple(channel_multipliers)} has {num_stages}.")
    for width in {base_channels * m for m in channel_multipliers}:
      if width % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide stage width {width}; pick "
                         "num_groups that divides base_channels * every multiplier.")
    if not 1 <= latent_bits <= lfq.MAX_BITS:
      raise ValueError(f"latent_bits={latent_bits} must be between 1 and {lfq.MAX_BITS}.")

    self.in_channels = in_channels
    self.latent_bits = latent_bits
    self.entropy_temperature = entropy_temperature
    self.exact_entropy_max_bits = exact_entropy_max_bits
    self.temporal_factor = 2 ** sum(bool(t) for t in temporal_downsample)
    self.spatial_factor = 2 ** sum(bool(s) for s in spatial_downsample)
    self.codebook_size = 2 ** latent_bits

    shared = dict(base_channels=base_channels, channel_multipliers=tuple(channel_multipliers),
                  num_res_blocks=num_res_blocks, temporal_downsample=tuple(temporal_downsample),
                  spatial_downsample=tuple(spatial_downsample), latent_bits=latent_bits,
                  num_groups=num_groups, time_padding=time_padding,
                  conv_implementation=conv_implementation, dtype=dtype, rngs=rngs)
    self.encoder = Encoder(in_channels=in_channels, **shared)
    self.decoder = Decoder(out_channels=in_channels, **shared)

  def check_video(self, video: jax.Array) -> None:
    """Raise ValueError unless video is (B, 1 + f*k, H, W, in_channels) with H, W divisible by s."""
    if video.ndim != 5:
      raise ValueError(f"video has shape {video.shape}; expected rank 5 (B, T, H, W, C). "
                       "Pass an image as a one-frame video, shape (B, 1, H, W, C).")
    _, num_frames, height, width, channels = video.shape
    if channels != self.in_channels:
      raise ValueError(f"video has {channels} channels (shape {video.shape}); this tokenizer "
                       f"was built with in_channels={self.in_channels}.")
    if height % self.spatial_factor or width % self.spatial_factor:
      raise ValueError(f"frame size {height}x{width} is not divisible by the spatial factor "
                       f"{self.spatial_factor}; resize or crop to a multiple of it.")
    if not valid_num_frames(num_frames, self.temporal_factor):
      raise ValueError(_frame_count_error(num_frames, self.temporal_factor))

  def encode(self, video: jax.Array) -> jax.Array:
    """Encode video (B, 1 + f*k, H, W, C) to continuous latents (B, 1 + k, H/s, W/s, K)."""
    self.check_video(video)
    return self.encoder(video)

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Quantize latents with LFQ and return (q, ids, aux) as `lfq.quantize` does."""
    return lfq.quantize(z, temperature=self.entropy_temperature,
                        exact_max_bits=self.exact_entropy_max_bits)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Decode latents (B, 1 + k, h, w, K), quantized or continuous, to video (B, 1 + f*k, ...)."""
    if latents.ndim != 5 or latents.shape[-1] != self.latent_bits:
      raise ValueError(f"latents have shape {latents.shape}; expected (B, T, h, w, "
                       f"{self.latent_bits}).")
    return self.decoder(latents)

  def decode_ids(self, ids: jax.Array) -> jax.Array:
    """Decode token ids (B, 1 + k, h, w) to video (B, 1 + f*k, h*s, w*s, C)."""
    if ids.ndim != 4:
      raise ValueError(f"ids have shape {ids.shape}; expected rank 4 (B, T, h, w).")
    return self.decode(lfq.ids_to_bits(ids, self.latent_bits))

  def __call__(self, video: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruct video through the quantizer.

    Returns:
      (recon, aux): recon has the video's shape. aux contains z (continuous latents), ids and the
      scalar per_sample_entropy, codebook_entropy, entropy_penalty and commitment_loss.
    """
    z = self.encode(video)
    q, ids, aux = self.quantize(z)
    recon = self.decode(q)
    return recon, {"z": z, "ids": ids, **aux}
