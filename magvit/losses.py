"""Training loss of the tokenizer: reconstruction plus the LFQ entropy and commitment terms."""

import jax
import jax.numpy as jnp

RECON_LOSSES = ("l1", "l2")


def tokenizer_loss(recon: jax.Array, target: jax.Array, aux: dict[str, jax.Array], *,
                   recon_loss: str = "l1", recon_weight: float = 1.0,
                   entropy_weight: float = 0.1, commitment_weight: float = 0.25,
                   perceptual_weight: float = 0.0,
                   gan_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Compute the weighted tokenizer loss.

  total = recon_weight * recon + entropy_weight * entropy_penalty
          + commitment_weight * commitment_loss

  Args:
    recon: reconstructed video (B, T, H, W, C).
    target: input video of the same shape.
    aux: the Tokenizer's aux dict; needs per_sample_entropy, codebook_entropy,
      entropy_penalty and commitment_loss.
    recon_loss: "l1" (mean absolute error) or "l2" (mean squared error).
    recon_weight: weight of the reconstruction term.
    entropy_weight: weight of the LFQ entropy penalty.
    commitment_weight: weight of the commitment loss.
    perceptual_weight: must be 0; the perceptual term is not implemented yet.
    gan_weight: must be 0; the adversarial term is not implemented yet.

  Returns:
    (loss, metrics): the scalar total loss, and scalars recon_loss, entropy_penalty,
    per_sample_entropy, codebook_entropy, commitment_loss (all unweighted) and total_loss.

  Raises:
    ValueError: for an unknown recon_loss or mismatched shapes.
    NotImplementedError: for a non-zero perceptual_weight or gan_weight.
  """
  if perceptual_weight:
    raise NotImplementedError(
        f"perceptual_weight={perceptual_weight}: the perceptual loss is not implemented in this "
        "version of the tokenizer; set perceptual_weight=0.0.")
  if gan_weight:
    raise NotImplementedError(
        f"gan_weight={gan_weight}: the adversarial (GAN) loss is not implemented in this "
        "version of the tokenizer; set gan_weight=0.0.")
  if recon_loss not in RECON_LOSSES:
    raise ValueError(f"recon_loss={recon_loss!r} is invalid; use one of {RECON_LOSSES}.")
  if recon.shape != target.shape:
    raise ValueError(f"recon shape {recon.shape} differs from target shape {target.shape}.")

  error = recon.astype(jnp.float32) - target.astype(jnp.float32)
  recon_term = jnp.mean(jnp.abs(error)) if recon_loss == "l1" else jnp.mean(jnp.square(error))

  total = (recon_weight * recon_term
           + entropy_weight * aux["entropy_penalty"]
           + commitment_weight * aux["commitment_loss"])
  metrics = {
      "recon_loss": recon_term,
      "entropy_penalty": aux["entropy_penalty"],
      "per_sample_entropy": aux["per_sample_entropy"],
      "codebook_entropy": aux["codebook_entropy"],
      "commitment_loss": aux["commitment_loss"],
      "total_loss": total,
  }
  return total, metrics
