"""Fréchet Video Distance (Unterthiner et al., 2018) with the Kinetics-400 I3D from `tokdiff.i3d`.

FVD fits a Gaussian to the I3D embeddings of each video set and returns the Fréchet distance
between the two Gaussians:

  ||mu_r - mu_f||^2 + Tr(S_r) + Tr(S_f) - 2 Tr((S_r S_f)^(1/2)).

The embedding is the 400-d time-averaged logits of I3D on clips resized to 224x224, as in the
reference implementation (google-research `frechet_video_distance.py`). Statistics and the
distance are computed on the host in float64.
"""

import functools
import logging

import jax
import numpy as np
import scipy.linalg
from flax import nnx

from tokdiff import i3d

# Slack around [-1, 1] for float input, the same as the range assertion in the reference code.
_RANGE_SLACK = 1e-3

# Relative size of the imaginary part of sqrtm's trace above which a warning is logged. The
# exact value is real, so a larger imaginary part means the covariances are badly conditioned.
_IMAGINARY_WARN = 1e-3


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Return the mean (D,) and the unbiased covariance (D, D) of (N, D) features, in float64."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must have shape (N, D), got {features.shape}.")
  if features.shape[0] < 2:
    raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}. "
                     "Embed more videos.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Compute the Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

  Args:
    mu1: mean (D,) of the first Gaussian.
    sigma1: covariance (D, D) of the first Gaussian.
    mu2: mean (D,) of the second Gaussian.
    sigma2: covariance (D, D) of the second Gaussian.

  Returns:
    The squared Fréchet (2-Wasserstein) distance, a float >= 0 up to rounding.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  dim = mu1.shape[0]
  for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                             ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
    if value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}, expected {shape} to match mu1.")

  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # sqrtm can fail on a singular product. A small ridge fixes that and barely moves the trace.
    offset = np.eye(dim) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

  trace_covmean = np.trace(covmean)
  if np.iscomplexobj(trace_covmean):
    if abs(trace_covmean.imag) > _IMAGINARY_WARN * max(1.0, abs(trace_covmean.real)):
      logging.warning("sqrtm(sigma1 @ sigma2) has trace %s with a large imaginary part because "
                      "the covariances are badly conditioned. Embed more videos.", trace_covmean)
    trace_covmean = trace_covmean.real

  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(graphdef: nnx.GraphDef, state: nnx.State, videos: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  _, features = model(i3d.preprocess(videos))
  return features


def _to_unit_range(videos: np.ndarray) -> np.ndarray:
  """Convert uint8 [0, 255] or float [-1, 1] videos to float32 [-1, 1], checking the range."""
  if videos.dtype == np.uint8:
    return videos.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(videos.dtype, np.floating):
    raise ValueError(f"videos must be uint8 in [0, 255] or float in [-1, 1], got dtype "
                     f"{videos.dtype}. Convert them with `.astype(np.uint8)` or scale to [-1, 1].")

  low, high = float(videos.min()), float(videos.max())
  if not (np.isfinite(low) and np.isfinite(high)):
    raise ValueError(f"videos contain NaN or infinite values (min {low}, max {high}).")
  if low < -1.0 - _RANGE_SLACK or high > 1.0 + _RANGE_SLACK:
    raise ValueError(f"float videos must lie in [-1, 1], got values in [{low}, {high}]. "
                     "Map [0, 1] frames with 2 * x - 1, or [0, 255] frames with x / 127.5 - 1.")
  return videos.astype(np.float32)


def embed_videos(videos: np.ndarray, batch_size: int = 16, model: i3d.I3D | None = None
                 ) -> np.ndarray:
  """Embed videos with a jitted I3D, one batch at a time.

  Args:
    videos: (N, T, H, W, 3) uint8 in [0, 255] or float in [-1, 1], with T >= 9. Frames of any
      size are resized to 224x224.
    batch_size: clips per I3D call. The last batch is padded to this size, so one compiled
      program serves every batch.
    model: I3D to use. Defaults to the cached `tokdiff.i3d.load_i3d()`.

  Returns:
    float32 array (N, 400): the time-averaged I3D logits that FVD uses.
  """
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"videos must have shape (N, T, H, W, 3), got {videos.shape}.")
  if videos.shape[0] == 0:
    raise ValueError("videos is empty. Pass at least one clip.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")

  graphdef, state = nnx.split(model if model is not None else i3d.load_i3d())
  outputs = []
  for start in range(0, videos.shape[0], batch_size):
    batch = _to_unit_range(np.asarray(videos[start:start + batch_size]))
    pad = batch_size - batch.shape[0]
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    # Dispatch is asynchronous, so the host prepares the next batch while this one runs.
    outputs.append(_embed_batch(graphdef, state, batch)[:batch_size - pad])
  return np.concatenate([np.asarray(out) for out in outputs])


def compute_fvd(real_videos: np.ndarray, fake_videos: np.ndarray, batch_size: int = 16) -> float:
  """Compute the FVD between two video sets.

  Args:
    real_videos: (N, T, H, W, 3) uint8 in [0, 255] or float in [-1, 1], N >= 2, T >= 9.
    fake_videos: same format. N, H and W may differ from `real_videos`.
    batch_size: clips per I3D call.

  Returns:
    The FVD as a float. Like FID, it is biased upwards for small sets, so compare models only
    at equal set sizes and clip lengths (the FVD paper uses 16-frame clips).
  """
  real = feature_stats(embed_videos(real_videos, batch_size))
  fake = feature_stats(embed_videos(fake_videos, batch_size))
  return frechet_distance(*real, *fake)
