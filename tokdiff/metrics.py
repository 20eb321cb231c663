"""Reconstruction metrics on videos in [-1, 1] (PSNR, SSIM) and codebook usage of token ids.

PSNR and SSIM are computed per frame with dm_pix and averaged over the frames of each video,
so they return one value per video, shape (B,). Images (B, H, W, C) count as one-frame videos.
"""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np


def _frames(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
  """Flatten videos (B, T, H, W, C) or images (B, H, W, C) to frames, and return (B, T) too."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}.")
  if a.ndim == 4:
    a, b = a[:, None], b[:, None]
  if a.ndim != 5:
    raise ValueError(f"expected videos (B, T, H, W, C) or images (B, H, W, C), got shape "
                     f"{a.shape}.")
  batch, frames = a.shape[:2]
  return a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]), (batch, frames)


def psnr(a: jax.Array, b: jax.Array, max_val: float = 2.0) -> jax.Array:
  """Compute the peak signal-to-noise ratio in dB, mean over frames, one value per video.

  Args:
    a: videos (B, T, H, W, C) or images (B, H, W, C).
    b: same shape as a.
    max_val: dynamic range of the values, 2.0 for [-1, 1]; PSNR is then the same as for
      frames mapped to [0, 1] with range 1.

  Returns:
    (B,) float32. A frame identical in a and b has infinite PSNR, so the video mean is inf too.
  """
  frames_a, frames_b, (batch, frames) = _frames(a, b)

  # dm_pix.psnr assumes a range of 1, so scale both inputs by 1 / max_val (offsets cancel).
  per_frame = dm_pix.psnr(frames_a / max_val, frames_b / max_val)
  return jnp.mean(per_frame.reshape(batch, frames), axis=1)


def ssim(a: jax.Array, b: jax.Array, *, filter_size: int = 11) -> jax.Array:
  """Compute the structural similarity of videos in [-1, 1], mean over frames, one per video.

  Frames are mapped to [0, 1] and compared with dm_pix.ssim (Gaussian window, sigma 1.5).

  Args:
    a: videos (B, T, H, W, C) or images (B, H, W, C), values in [-1, 1].
    b: same shape as a.
    filter_size: Gaussian window size; frames must be at least this large in height and width.

  Returns:
    (B,) float32; 1.0 for identical videos.
  """
  frames_a, frames_b, (batch, frames) = _frames(a, b)
  height, width = frames_a.shape[1:3]
  if min(height, width) < filter_size:
    raise ValueError(f"frames of {height}x{width} are smaller than the SSIM window "
                     f"filter_size={filter_size}; pass a smaller odd filter_size.")

  per_frame = dm_pix.ssim((frames_a + 1.0) / 2.0, (frames_b + 1.0) / 2.0, max_val=1.0,
                          filter_size=filter_size)
  return jnp.mean(per_frame.reshape(batch, frames), axis=1)


def codebook_usage(ids: jax.Array | np.ndarray, codebook_size: int) -> dict[str, float]:
  """Measure how much of the codebook a set of token ids uses.

  Args:
    ids: integer token ids of any shape, each in [0, codebook_size).
    codebook_size: number of possible ids.

  Returns:
    fraction_used: distinct ids seen / codebook_size.
    perplexity: exp of the entropy (in nats) of the empirical id histogram. It equals the
      number of ids used when they are equally frequent, and 1 when only one id appears.
  """
  ids = np.asarray(ids).reshape(-1)
  if ids.size == 0:
    raise ValueError("ids is empty; pass at least one token id.")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids have dtype {ids.dtype}; expected an integer dtype.")
  if ids.min() < 0 or ids.max() >= codebook_size:
    raise ValueError(f"ids span [{ids.min()}, {ids.max()}], outside [0, {codebook_size}); "
                     "check codebook_size.")

  counts = np.bincount(ids, minlength=codebook_size)
  probs = counts[counts > 0] / ids.size
  entropy = -np.sum(probs * np.log(probs))
  return {
      "fraction_used": float(np.count_nonzero(counts) / codebook_size),
      "perplexity": float(np.exp(entropy)),
  }
