"""Tests for the Flax I3D port, its weight loading, the Fréchet distance and FVD."""

import copy
import importlib.util
import os

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokdiff import fvd
from tokdiff import i3d

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _load_recorder():
  """Import tests/data/record_i3d_logits.py, which decodes the clips the fixture was made from."""
  spec = importlib.util.spec_from_file_location(
      "record_i3d_logits", os.path.join(_DATA, "record_i3d_logits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def carphone_clips() -> np.ndarray:
  return _load_recorder().load_carphone_clips()


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
  with np.load(os.path.join(_DATA, "i3d_carphone_logits.npz")) as data:
    return dict(data)


def _leaf_arrays(tree) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance through symmetric eigendecompositions, independent of scipy's sqrtm.

  Tr((S1 S2)^(1/2)) equals Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), whose matrix is symmetric PSD.
  """
  values, vectors = np.linalg.eigh(sigma1)
  sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
  inner = np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
  trace_sqrt = np.sqrt(np.clip(inner, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
  mean = rng.normal(size=dim) * 2.0
  factor = rng.normal(size=(dim, 2 * dim))
  return mean, factor @ factor.T / (2 * dim) + 0.1 * np.eye(dim)


def test_load_i3d_uses_every_checkpoint_weight():
  model = i3d.load_i3d()
  checkpoint = i3d.read_checkpoint()

  params = _leaf_arrays(nnx.state(model, nnx.Param))
  stats = _leaf_arrays(nnx.state(model, nnx.BatchStat))
  num_params = sum(a.size for a in params)
  num_stats = sum(a.size for a in stats)
  print(f"I3D: {num_params:,} parameters and {num_stats:,} batch statistics")
  assert 12.6e6 < num_params + num_stats < 12.8e6

  # Each checkpoint array must appear in the model exactly once, compared by size and content
  # (not by name), so this also catches a wrong name mapping that left a variable random.
  def signatures(arrays):
    return sorted((a.size, round(float(np.sum(a, dtype=np.float64)), 6),
                   round(float(np.sum(np.abs(a), dtype=np.float64)), 6)) for a in arrays)

  ckpt_arrays = _leaf_arrays(checkpoint)
  assert len(ckpt_arrays) == len(params) + len(stats)
  assert signatures(ckpt_arrays) == signatures(params + stats)
  assert sum(a.size for a in _leaf_arrays(checkpoint["params"])) == num_params


def test_load_weights_rejects_missing_and_unused_keys():
  checkpoint = i3d.read_checkpoint()
  abstract = lambda: nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))

  incomplete = copy.deepcopy(checkpoint)
  del incomplete["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]
  with pytest.raises(ValueError, match="mixed_4c/branch_2b/conv/kernel"):
    i3d.load_weights(abstract(), incomplete)

  extra = copy.deepcopy(checkpoint)
  extra["params"]["Conv3d_1a_7x7"]["Conv_0"]["bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="conv_1a/conv/bias"):
    i3d.load_weights(abstract(), extra)


def test_i3d_black_clip_matches_tfhub():
  # TF-Hub deepmind/i3d-kinetics-400/1 through the google-research FVD code, on 15 black
  # 224x224 frames (all -1 after scaling): first and last three logits as printed in
  # github.com/zhanganny/cal_FVD, file my_suc.py.
  tfhub_first = np.array([0.7422105, 2.829727, 0.39993525])
  tfhub_last = np.array([-0.38092658, 0.65539014, -1.4021297])

  video = jnp.full((1, 15, 224, 224, 3), -1.0, jnp.float32)
  logits, features = nnx.jit(lambda model, x: model(x))(i3d.load_i3d(), video)

  chex.assert_shape((logits, features), (1, 400))
  np.testing.assert_allclose(logits[0, :3], tfhub_first, atol=2e-4)
  np.testing.assert_allclose(logits[0, -3:], tfhub_last, atol=2e-4)


def test_i3d_carphone_logits_match_fixture(carphone_clips, recorded):
  # Batch size 2 for 3 clips also runs the padded last batch of embed_videos.
  logits = fvd.embed_videos(carphone_clips, batch_size=2)

  chex.assert_shape(logits, (3, 400))
  np.testing.assert_allclose(logits, recorded["logits"], atol=2e-3, rtol=1e-3)
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  print(f"top-5 Kinetics-400 class ids per clip: {top5.tolist()}")
  np.testing.assert_array_equal(top5, recorded["top5"])

  # The clips differ, so their embeddings must too (a constant output would match nothing).
  assert np.abs(logits[0] - logits[2]).max() > 0.5


def test_i3d_rejects_wrong_input_shape():
  model = nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="224x224"):
    model(jnp.zeros((1, 16, 128, 128, 3)))
  with pytest.raises(ValueError, match="at least 9 frames"):
    model(jnp.zeros((1, 8, 224, 224, 3)))

  # The shortest accepted clip must still run through every layer (shapes only, no compute).
  logits, _ = nnx.eval_shape(lambda m, x: m(x), model,
                             jax.ShapeDtypeStruct((1, i3d.MIN_FRAMES, 224, 224, 3), jnp.float32))
  chex.assert_shape(logits, (1, 400))


def test_preprocess_matches_tf_legacy_bilinear():
  # 112 -> 224 doubles each axis: TF1 resize_bilinear (no corner alignment, no half-pixel
  # centers) copies source pixel i to 2i, averages neighbours at 2i+1, and repeats the last.
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, size=(1, 1, 112, 112, 3)).astype(np.float32)
  out = np.asarray(i3d.preprocess(jnp.asarray(frames)))[0, 0]
  src = frames[0, 0]

  chex.assert_shape(out, (224, 224, 3))
  np.testing.assert_allclose(out[::2, ::2], src, atol=1e-6)
  np.testing.assert_allclose(out[1:-1:2, ::2], (src[:-1] + src[1:]) / 2, atol=1e-6)
  np.testing.assert_allclose(out[-1, ::2], src[-1], atol=1e-6)

  # Frames already at 224x224 pass through unchanged, and uint8 maps 0 to -1 and 255 to 1.
  full = rng.uniform(-1, 1, size=(1, 1, 224, 224, 3)).astype(np.float32)
  np.testing.assert_allclose(i3d.preprocess(jnp.asarray(full)), full, atol=1e-6)
  corners = i3d.preprocess(jnp.array([0, 255], jnp.uint8).reshape(1, 1, 1, 2, 1).repeat(3, -1))
  np.testing.assert_allclose(corners[0, 0, 0, [0, -1], 0], [-1.0, 1.0], atol=1e-6)


def test_frechet_distance_matches_eigen_reference():
  rng = np.random.default_rng(0)
  for dim in (1, 8, 64):
    mu1, sigma1 = _random_gaussian(rng, dim)
    mu2, sigma2 = _random_gaussian(rng, dim)

    distance = fvd.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(distance, _reference_frechet(mu1, sigma1, mu2, sigma2),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(distance, fvd.frechet_distance(mu2, sigma2, mu1, sigma1),
                               rtol=1e-9, atol=1e-9)
    assert distance > 0.0
    assert abs(fvd.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-8


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="sigma2"):
    fvd.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(3))


def test_feature_stats_mean_and_unbiased_covariance():
  features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mean, cov = fvd.feature_stats(features)

  chex.assert_shape((mean, cov), [(6,), (6, 6)])
  assert mean.dtype == np.float64
  assert cov.dtype == np.float64
  centered = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
  np.testing.assert_allclose(mean, features.astype(np.float64).mean(axis=0), atol=1e-12)
  np.testing.assert_allclose(cov, centered.T @ centered / 49, atol=1e-12)
  with pytest.raises(ValueError, match="at least 2"):
    fvd.feature_stats(features[:1])


def test_fvd_of_set_with_itself_is_zero(carphone_clips):
  clips = carphone_clips[:2]
  as_float = clips.astype(np.float32) / 127.5 - 1.0

  # The same videos given as uint8 and as [-1, 1] floats must embed identically.
  assert abs(fvd.compute_fvd(clips, as_float, batch_size=2)) < 1e-2

  # Photographic negatives are far from the originals in I3D space.
  assert fvd.compute_fvd(clips, 255 - clips, batch_size=2) > 100.0


def test_compute_fvd_rejects_out_of_range_floats(carphone_clips):
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    fvd.compute_fvd(carphone_clips.astype(np.float32), carphone_clips, batch_size=2)
