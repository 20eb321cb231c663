"""Tests of lookup-free quantization: id/bit mapping, entropy terms and gradients."""

import math

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np
import pytest

from magvit import lfq

K = 6


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_ids_bits_round_trip_every_id():
  ids = jnp.arange(2 ** K, dtype=jnp.int32)
  bits = lfq.ids_to_bits(ids, K)

  chex.assert_shape(bits, (2 ** K, K))
  np.testing.assert_array_equal(np.abs(np.asarray(bits)), 1.0)
  np.testing.assert_array_equal(np.asarray(lfq.bits_to_ids(bits)), np.arange(2 ** K))

  # Every code is distinct, so bits -> ids -> bits is also exact.
  np.testing.assert_array_equal(np.asarray(lfq.ids_to_bits(lfq.bits_to_ids(bits), K)),
                                np.asarray(bits))


def test_bit_k_is_channel_k():
  # Channels 0 and 2 positive: id = 2**0 + 2**2.
  bits = jnp.array([1.0, -1.0, 1.0, -1.0])
  assert int(lfq.bits_to_ids(bits)) == 5
  np.testing.assert_array_equal(np.asarray(lfq.ids_to_bits(jnp.int32(5), 4)), np.asarray(bits))


def test_zero_quantizes_to_plus_one():
  q, ids, _ = lfq.quantize(jnp.zeros((2, K)))
  np.testing.assert_array_equal(np.asarray(q), 1.0)
  np.testing.assert_array_equal(np.asarray(ids), 2 ** K - 1)


def test_quantize_values_and_ids():
  z = _normal(0, (3, 4, K))
  q, ids, _ = lfq.quantize(z)

  chex.assert_shape(ids, (3, 4))
  chex.assert_type(ids, jnp.int32)
  np.testing.assert_array_equal(np.asarray(q), np.where(np.asarray(z) >= 0, 1.0, -1.0))
  np.testing.assert_array_equal(np.asarray(lfq.ids_to_bits(ids, K)), np.asarray(q))


def test_invalid_bits_and_temperature_raise():
  with pytest.raises(ValueError, match="1 to 30 bits"):
    lfq.bits_to_ids(jnp.ones((31,)))
  with pytest.raises(ValueError, match="temperature"):
    lfq.entropy_terms(jnp.ones((2, K)), temperature=0.0)


@pytest.mark.parametrize("exact_max_bits", [12, 0], ids=["exact", "factorised"])
def test_confident_diverse_codes_penalty_negative(exact_max_bits):
  # Every code once, scaled far from 0: each position is certain, the batch is uniform.
  z = 2.0 * lfq.codebook(K)
  _, _, aux = lfq.quantize(z, temperature=0.01, exact_max_bits=exact_max_bits)

  assert float(aux["per_sample_entropy"]) < 1e-3
  np.testing.assert_allclose(float(aux["codebook_entropy"]), K * math.log(2), rtol=1e-4)
  assert float(aux["entropy_penalty"]) < -0.99 * K * math.log(2)


@pytest.mark.parametrize("exact_max_bits", [12, 0], ids=["exact", "factorised"])
def test_confident_identical_codes_penalty_zero(exact_max_bits):
  code = 2.0 * lfq.ids_to_bits(jnp.int32(13), K)
  z = jnp.broadcast_to(code, (32, K))
  _, _, aux = lfq.quantize(z, temperature=0.01, exact_max_bits=exact_max_bits)

  assert abs(float(aux["per_sample_entropy"])) < 1e-3
  assert abs(float(aux["codebook_entropy"])) < 1e-3
  assert abs(float(aux["entropy_penalty"])) < 1e-3


@pytest.mark.parametrize("exact_max_bits", [12, 0], ids=["exact", "factorised"])
def test_uniform_probabilities_entropy_k_ln2(exact_max_bits):
  # z = 0 is equally far from every code, so each position's distribution is uniform.
  _, _, aux = lfq.quantize(jnp.zeros((8, K)), exact_max_bits=exact_max_bits)
  np.testing.assert_allclose(float(aux["per_sample_entropy"]), K * math.log(2), rtol=1e-5)
  np.testing.assert_allclose(float(aux["codebook_entropy"]), K * math.log(2), rtol=1e-5)


def test_factorised_entropy_against_exact():
  z = 0.05 * _normal(1, (64, K))
  exact = lfq.entropy_terms(z, temperature=0.1, exact_max_bits=K)
  factorised = lfq.entropy_terms(z, temperature=0.1, exact_max_bits=K - 1)

  # Per-position distributions factorise over bits, so this term is the same on both paths.
  np.testing.assert_allclose(float(factorised[0]), float(exact[0]), rtol=1e-4)

  # Summing per-bit entropies of the averaged bits bounds the joint entropy from above.
  assert float(factorised[1]) >= float(exact[1]) - 1e-5


def test_codebook_entropy_uses_whole_batch():
  # First half all code 3, second half all code 40: each half alone has codebook entropy 0.
  half_a = jnp.broadcast_to(2.0 * lfq.ids_to_bits(jnp.int32(3), K), (8, K))
  half_b = jnp.broadcast_to(2.0 * lfq.ids_to_bits(jnp.int32(40), K), (8, K))
  z = jnp.concatenate([half_a, half_b])

  _, _, whole = lfq.quantize(z)
  _, _, first = lfq.quantize(half_a)
  _, _, second = lfq.quantize(half_b)

  mean_of_halves = (float(first["codebook_entropy"]) + float(second["codebook_entropy"])) / 2
  assert mean_of_halves < 1e-3
  np.testing.assert_allclose(float(whole["codebook_entropy"]), math.log(2), rtol=1e-4)


def test_sharded_jit_equals_unsharded():
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  z = 0.3 * _normal(2, (16, 3, 2, 2, K))
  sharded_z = jax.device_put(z, NamedSharding(mesh, PartitionSpec("data")))
  assert len(sharded_z.sharding.device_set) == 8

  def aux_of(latents):
    return lfq.quantize(latents, temperature=0.1)[2]

  expected = aux_of(z)
  actual = jax.jit(aux_of)(sharded_z)
  for name in expected:
    np.testing.assert_allclose(float(actual[name]), float(expected[name]), rtol=1e-5,
                               err_msg=name)


def test_straight_through_gradient():
  z = _normal(3, (4, K))
  weights = _normal(4, (4, K))

  grad = jax.grad(lambda latents: jnp.sum(lfq.quantize(latents)[0] * weights))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(weights), rtol=1e-6)


def test_commitment_loss_value_and_gradient():
  z = jnp.array([[0.5, -2.0], [0.0, 1.5]])
  # Distances to the quantized values (+1, -1), (+1, +1): squared norms 1.25 and 1.25.
  _, _, aux = lfq.quantize(z)
  np.testing.assert_allclose(float(aux["commitment_loss"]), 1.25, rtol=1e-6)

  # The quantized target is held fixed, so d/dz of mean ||z - q||^2 is 2 (z - q) / positions.
  grad = jax.grad(lambda latents: lfq.quantize(latents)[2]["commitment_loss"])(z)
  q = jnp.where(z >= 0, 1.0, -1.0)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(2 * (z - q) / 2), rtol=1e-6)
