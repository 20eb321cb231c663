"""Tests of PSNR, SSIM and codebook usage."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from tokdiff import metrics


def _video(seed, shape=(2, 3, 16, 16, 3), scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.uniform(-1, 1, shape), jnp.float32)


def test_psnr_identical_is_infinite():
  video = _video(0)
  value = metrics.psnr(video, video)
  chex.assert_shape(value, (2,))
  assert np.all(np.isinf(np.asarray(value)))


def test_psnr_constant_offset():
  video = _video(1, scale=0.5)
  offsets = jnp.array([0.2, 0.02]).reshape(2, 1, 1, 1, 1)
  value = metrics.psnr(video + offsets, video)

  # MSE = offset^2 on a value range of 2, so PSNR = 10 log10(2^2 / offset^2).
  expected = [10 * math.log10(4.0 / offset ** 2) for offset in (0.2, 0.02)]
  np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-4)


def test_psnr_averages_frames_not_errors():
  video = _video(2, (1, 2, 16, 16, 3), scale=0.5)
  offsets = jnp.array([0.1, 0.01]).reshape(1, 2, 1, 1, 1)
  value = metrics.psnr(video + offsets, video)

  per_frame = [10 * math.log10(4.0 / offset ** 2) for offset in (0.1, 0.01)]
  np.testing.assert_allclose(float(value[0]), np.mean(per_frame), rtol=1e-4)


def test_psnr_accepts_images():
  image = _video(3, (2, 16, 16, 3), scale=0.5)
  value = metrics.psnr(image + 0.2, image)
  np.testing.assert_allclose(np.asarray(value), 10 * math.log10(4.0 / 0.04), rtol=1e-4)


def test_ssim_identical_is_one():
  video = _video(4)
  value = metrics.ssim(video, video)
  chex.assert_shape(value, (2,))
  np.testing.assert_allclose(np.asarray(value), 1.0, atol=1e-5)


def test_ssim_drops_with_noise():
  video = _video(5)
  small = metrics.ssim(video + 0.05 * _video(6), video)
  large = metrics.ssim(jnp.clip(video + 0.5 * _video(7), -1, 1), video)
  assert np.all(np.asarray(small) < 1.0)
  assert np.all(np.asarray(large) < np.asarray(small))


def test_ssim_rejects_frames_smaller_than_window():
  video = _video(8, (1, 1, 8, 8, 3))
  with pytest.raises(ValueError, match="filter_size=11"):
    metrics.ssim(video, video)
  np.testing.assert_allclose(np.asarray(metrics.ssim(video, video, filter_size=7)), 1.0,
                             atol=1e-5)


def test_metrics_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.psnr(_video(9), _video(9)[:, :2])


def test_codebook_usage_known_histograms():
  even = metrics.codebook_usage(np.array([0, 0, 1, 1]), codebook_size=4)
  assert even["fraction_used"] == 0.5
  np.testing.assert_allclose(even["perplexity"], 2.0, rtol=1e-12)

  single = metrics.codebook_usage(np.full((3, 5), 7), codebook_size=8)
  assert single["fraction_used"] == 1 / 8
  np.testing.assert_allclose(single["perplexity"], 1.0, rtol=1e-12)

  # Counts 3 and 1: entropy -(0.75 ln 0.75 + 0.25 ln 0.25).
  skewed = metrics.codebook_usage(jnp.array([[2, 2], [2, 5]]), codebook_size=8)
  entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert skewed["fraction_used"] == 2 / 8
  np.testing.assert_allclose(skewed["perplexity"], math.exp(entropy), rtol=1e-12)

  full = metrics.codebook_usage(np.arange(16) % 8, codebook_size=8)
  assert full["fraction_used"] == 1.0
  np.testing.assert_allclose(full["perplexity"], 8.0, rtol=1e-12)


def test_codebook_usage_rejects_out_of_range_ids():
  with pytest.raises(ValueError, match="outside"):
    metrics.codebook_usage(np.array([0, 8]), codebook_size=8)
  with pytest.raises(ValueError, match="outside"):
    metrics.codebook_usage(np.array([-1, 2]), codebook_size=8)
