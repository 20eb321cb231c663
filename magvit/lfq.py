"""Lookup-free quantization (LFQ), as in MAGVIT-v2 (Yu et al., 2023, arXiv:2310.05737).

Each of the K latent channels is quantized to -1 or +1 on its own (0 maps to +1). The implicit
codebook is {-1, +1}^K, and a token id is the integer whose bit k is 1 where channel k is +1, so
the codebook size is 2^K.

The entropy penalty pushes each position towards a confident code (low per-position entropy)
while the batch as a whole spreads over many codes (high entropy of the batch-averaged code
distribution). Both terms use plain means over every position passed in. Under jit on a batch
sharded over devices, the means therefore cover the global batch and XLA inserts the reductions.
"""

import jax
import jax.numpy as jnp

# Token ids are int32, so bit 31 (the sign bit) must stay unused.
MAX_BITS = 30

# Clamp for log(p) of a batch-averaged probability. Averaged probabilities can underflow to 0,
# and log(0) would give an infinite gradient.
_MIN_PROB = 1e-30


def _check_num_bits(num_bits: int) -> None:
  if not 1 <= num_bits <= MAX_BITS:
    raise ValueError(f"LFQ supports 1 to {MAX_BITS} bits so ids fit in int32, got {num_bits}.")


def bits_to_ids(bits: jax.Array) -> jax.Array:
  """Convert signs (..., K) to int32 token ids (...,); bit k is 1 where bits[..., k] >= 0."""
  num_bits = bits.shape[-1]
  _check_num_bits(num_bits)
  weights = jnp.left_shift(jnp.int32(1), jnp.arange(num_bits, dtype=jnp.int32))
  return jnp.sum(jnp.where(bits >= 0, weights, 0), axis=-1, dtype=jnp.int32)


def ids_to_bits(ids: jax.Array, num_bits: int) -> jax.Array:
  """Convert int32 token ids (...,) to float32 codes (..., K) of -1 and +1 (bit k -> channel k)."""
  _check_num_bits(num_bits)
  shifts = jnp.arange(num_bits, dtype=jnp.int32)
  set_bits = jnp.bitwise_and(jnp.right_shift(ids.astype(jnp.int32)[..., None], shifts), 1)
  return jnp.where(set_bits == 1, 1.0, -1.0).astype(jnp.float32)


def codebook(num_bits: int) -> jax.Array:
  """Return every code as a (2^K, K) float32 matrix of -1 and +1; row i is the code of id i."""
  return ids_to_bits(jnp.arange(2 ** num_bits, dtype=jnp.int32), num_bits)


def _entropy_of_mean(probs: jax.Array) -> jax.Array:
  """Return the entropy, summed over the last axis, of probabilities averaged over axis 0."""
  mean = jnp.mean(probs, axis=0)
  return -jnp.sum(mean * jnp.log(jnp.maximum(mean, _MIN_PROB)), axis=-1)


def _exact_entropies(flat: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Return entropies from the full distribution over all 2^K codes at each position."""
  # -||z - c||^2 = 2 z.c - ||z||^2 - K, and the last two terms are the same for every code c,
  # so the softmax over codes only needs 2 z.c.
  logits = 2.0 * (flat @ codebook(flat.shape[-1]).T) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  probs = jnp.exp(log_probs)

  per_sample = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
  return per_sample, _entropy_of_mean(probs)


def _factorised_entropies(flat: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Return entropies from per-bit probabilities, for codebooks too large to enumerate."""
  # The distance to +1 and to -1 differ by 4 z in the exponent, so P(bit = +1) = sigmoid(4 z / T).
  logits = 4.0 * flat / temperature
  p_plus = jax.nn.sigmoid(logits)
  bit_entropy = -(p_plus * jax.nn.log_sigmoid(logits)
                  + (1.0 - p_plus) * jax.nn.log_sigmoid(-logits))

  # The per-position code distribution is a product over bits, so summing bit entropies is exact.
  per_sample = jnp.mean(jnp.sum(bit_entropy, axis=-1))

  # NOTE: the batch-averaged code distribution is not a product over bits. The sum of the
  # entropies of the averaged bits is an upper bound on its entropy, and it equals that
  # entropy only when the bits are independent across the batch.
  stacked = jnp.stack([p_plus, 1.0 - p_plus], axis=-1)
  codebook_entropy = jnp.sum(_entropy_of_mean(stacked), axis=-1)
  return per_sample, codebook_entropy


def entropy_terms(z: jax.Array, *, temperature: float,
                  exact_max_bits: int = 12) -> tuple[jax.Array, jax.Array]:
  """Compute the LFQ entropies of continuous latents, in nats.

  Code probabilities at a position are softmax over codes c of -||z - c||^2 / temperature.

  Args:
    z: latents (..., K); every leading position counts as one sample.
    temperature: softmax temperature; smaller makes the code distribution sharper.
    exact_max_bits: use the full 2^K distribution when K is at most this, and per-bit
      probabilities above it. The exact path stores (positions, 2^K) probabilities.

  Returns:
    (per_sample_entropy, codebook_entropy): the mean entropy of each position's code
    distribution, and the entropy of that distribution averaged over all positions.
  """
  num_bits = z.shape[-1]
  _check_num_bits(num_bits)
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be positive.")

  flat = z.reshape(-1, num_bits).astype(jnp.float32)
  if num_bits <= exact_max_bits:
    return _exact_entropies(flat, temperature)
  return _factorised_entropies(flat, temperature)


def quantize(z: jax.Array, *, temperature: float = 0.01,
             exact_max_bits: int = 12) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Quantize each channel to -1 or +1 and compute the LFQ auxiliary losses.

  Args:
    z: continuous latents (..., K).
    temperature: softmax temperature of the entropy terms (see `entropy_terms`).
    exact_max_bits: largest K for which the entropies use the full 2^K distribution.

  Returns:
    (q, ids, aux). q has z's shape and dtype with values -1 and +1, and its gradient passes
    straight through to z. ids are int32 (...,). aux contains scalar per_sample_entropy,
    codebook_entropy, entropy_penalty (their difference, to be minimised) and commitment_loss
    (the mean over positions of ||z - stop_gradient(q)||^2).
  """
  hard = jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)

  # Straight-through estimator: the forward value is `hard`, the gradient is the identity.
  q = z + jax.lax.stop_gradient(hard - z)
  ids = bits_to_ids(hard)

  residual = z.astype(jnp.float32) - jax.lax.stop_gradient(hard).astype(jnp.float32)
  commitment_loss = jnp.mean(jnp.sum(jnp.square(residual), axis=-1))

  per_sample, codebook_entropy = entropy_terms(
      z, temperature=temperature, exact_max_bits=exact_max_bits)
  aux = {
      "per_sample_entropy": per_sample,
      "codebook_entropy": codebook_entropy,
      "entropy_penalty": per_sample - codebook_entropy,
      "commitment_loss": commitment_loss,
  }
  return q, ids, aux
