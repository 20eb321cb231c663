"""Variance-preserving noise schedules in continuous time, v-prediction conversions and the loss.

Notation: for t in [0, 1], x_t = alpha(t) * x0 + sigma(t) * eps with alpha^2 + sigma^2 = 1,
alpha_bar = alpha^2 and logSNR = log(alpha^2 / sigma^2). The model predicts the velocity
v = alpha * eps - sigma * x0. Because alpha^2 + sigma^2 = 1, the conversions from v to x0 and to
eps need no division and are finite at every t.

Edge values, and how they stay finite:
  * alpha_bar is clipped to [0, 1], so alpha and sigma lie in [0, 1] at t = 0 and t = 1.
  * logSNR is infinite where alpha or sigma is 0 (t = 0 for both schedules, and t = 1 with a
    zero terminal SNR). It is clipped to [-LOG_SNR_LIMIT, LOG_SNR_LIMIT].
  * Conversions that divide by sigma or alpha (v from x0, v from eps) clamp the divisor to at
    least MIN_DIVISOR, so they are finite but inexact where that coefficient is below it.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# Bound on |logSNR|. An SNR of exp(20), about 4.9e8, is a sigma of about 4.5e-5.
LOG_SNR_LIMIT = 20.0

# Smallest divisor used by the conversions that divide by alpha or sigma.
MIN_DIVISOR = 1e-6

# Offset s of the cosine schedule alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), normalised to
# 1 at t = 0. The offset makes the noise grow faster near t = 0 than plain cos^2(t * pi / 2).
COSINE_OFFSET = 0.008

# Continuous-time form of the DDPM linear beta schedule: betas 1e-4 to 0.02 over 1000 steps are
# beta(t) = 0.1 + 19.9 t per unit time, so alpha_bar(t) = exp(-(0.1 t + 9.95 t^2)).
LINEAR_BETA_MIN = 0.1
LINEAR_BETA_MAX = 20.0

SCHEDULE_KINDS = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Continuous-time variance-preserving schedule.

    Attributes:
      kind: "cosine" (alpha_bar = cos^2 of the offset time) or "linear" (the continuous form of
        the DDPM linear beta schedule).
      zero_terminal_snr: whether to shift and rescale alpha so that alpha(1) = 0 while alpha(0)
        is unchanged (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed",
        arXiv:2305.08891). Sampling then starts from pure noise.
    """

    kind: str = "cosine"
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"Unknown noise schedule kind {self.kind!r}: expected one of {SCHEDULE_KINDS}."
            )


def _raw_alpha_bar(kind: str, t: jax.Array) -> jax.Array:
    if kind == "cosine":
        angle = (t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * (math.pi / 2)
        angle_at_zero = COSINE_OFFSET / (1.0 + COSINE_OFFSET) * (math.pi / 2)
        value = (jnp.cos(angle) / math.cos(angle_at_zero)) ** 2
    else:
        value = jnp.exp(-(LINEAR_BETA_MIN * t + 0.5 * (LINEAR_BETA_MAX - LINEAR_BETA_MIN) * t**2))
    # float32 rounding can push the cosine slightly outside [0, 1] at the ends.
    return jnp.clip(value, 0.0, 1.0)


def alpha_bar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Return alpha_bar(t) = alpha(t)^2 in [0, 1] for times t in [0, 1] (any shape)."""
    alpha, _ = alpha_sigma(schedule, t)
    return alpha**2


def alpha_sigma(schedule: NoiseSchedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return (alpha(t), sigma(t)), both in [0, 1] with alpha^2 + sigma^2 = 1.

    Times are clipped to [0, 1]. With `zero_terminal_snr`, alpha is mapped linearly so that
    alpha(1) = 0 and alpha(0) keeps its value: alpha' = (alpha - alpha_1) * alpha_0 /
    (alpha_0 - alpha_1).

    NOTE: sigma is computed as sqrt(1 - alpha^2) in float32, so it rounds to 0 for t below about
    1e-5 (cosine) or 1e-6 (linear) and is coarse just above that.
    """
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
    alpha = jnp.sqrt(_raw_alpha_bar(schedule.kind, t))

    if schedule.zero_terminal_snr:
        alpha_0 = jnp.sqrt(_raw_alpha_bar(schedule.kind, jnp.float32(0.0)))
        alpha_1 = jnp.sqrt(_raw_alpha_bar(schedule.kind, jnp.float32(1.0)))
        alpha = (alpha - alpha_1) * alpha_0 / (alpha_0 - alpha_1)
        alpha = jnp.clip(alpha, 0.0, 1.0)

    sigma = jnp.sqrt(jnp.clip(1.0 - alpha**2, 0.0, 1.0))
    return alpha, sigma


def log_snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Return logSNR(t) = log(alpha^2 / sigma^2), clipped to [-LOG_SNR_LIMIT, LOG_SNR_LIMIT]."""
    alpha, sigma = alpha_sigma(schedule, t)
    # The floor keeps log() off zero, and the clip then maps both ends to finite bounds.
    tiny = jnp.finfo(jnp.float32).tiny
    value = jnp.log(jnp.maximum(alpha**2, tiny)) - jnp.log(jnp.maximum(sigma**2, tiny))
    return jnp.clip(value, -LOG_SNR_LIMIT, LOG_SNR_LIMIT)


def _per_sample(coefficient: jax.Array, x: jax.Array) -> jax.Array:
    # Broadcast a scalar or (B,) coefficient over the trailing axes of x (B, ...).
    coefficient = jnp.asarray(coefficient, x.dtype)
    return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))


def diffuse(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return x_t = alpha * x0 + sigma * eps (alpha and sigma scalar or per sample)."""
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * eps


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return the velocity v = alpha * eps - sigma * x0."""
    return _per_sample(alpha, x0) * eps - _per_sample(sigma, x0) * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return x0 = alpha * x_t - sigma * v (exact and finite for every t)."""
    return _per_sample(alpha, x_t) * x_t - _per_sample(sigma, x_t) * v


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return eps = sigma * x_t + alpha * v (exact and finite for every t)."""
    return _per_sample(sigma, x_t) * x_t + _per_sample(alpha, x_t) * v


def v_from_x0(x_t: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return v = (alpha * x_t - x0) / sigma, with sigma clamped to at least MIN_DIVISOR.

    The clamp makes the result finite at t = 0 (sigma = 0) but inexact where sigma < MIN_DIVISOR.
    """
    divisor = jnp.maximum(_per_sample(sigma, x_t), MIN_DIVISOR)
    return (_per_sample(alpha, x_t) * x_t - x0) / divisor


def v_from_eps(x_t: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return v = (eps - sigma * x_t) / alpha, with alpha clamped to at least MIN_DIVISOR.

    The clamp makes the result finite at a zero terminal SNR (alpha(1) = 0) but inexact where
    alpha < MIN_DIVISOR.
    """
    divisor = jnp.maximum(_per_sample(alpha, x_t), MIN_DIVISOR)
    return (eps - _per_sample(sigma, x_t) * x_t) / divisor


def _self_condition_estimate(model, x_t, times, labels, use_estimate, alpha, sigma):
    """Return a gradient-free x0 estimate from a first model pass, or zeros.

    One coin flip per batch decides, through lax.cond, so the first pass is skipped at run time
    when it is not used.
    """
    graphdef, state = nnx.split(model)

    def first_pass(_):
        v = nnx.merge(graphdef, state)(x_t, times, labels)
        return jax.lax.stop_gradient(x0_from_v(x_t, v, alpha, sigma))

    return jax.lax.cond(use_estimate, first_pass, jnp.zeros_like, x_t)


def diffusion_loss(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    schedule: NoiseSchedule,
    self_cond_prob: float,
    label_dropout: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the v-prediction mean squared error on one batch.

    Times are drawn uniformly from [0, 1]. Each label is replaced by the model's null label with
    probability `label_dropout`, which trains the unconditional branch used by guidance.

    Args:
      model: a `WaltTransformer` (or any module with the same call signature, `null_label` and
        `self_condition`).
      batch: {'latents': float32 (B, t, h, w, C), 'label': int32 (B,)}.
      rng: PRNG key for times, noise, label dropout and the self-conditioning coin.
      schedule: the noise schedule.
      self_cond_prob: probability that the batch first gets an x0 estimate from a pass without
        gradient, which is then fed back as self-conditioning input. Ignored (no first pass) when
        the model has self_condition=False.
      label_dropout: per-sample probability of training with the null label.

    Returns:
      (loss, metrics): the scalar loss and {'loss', 'x0_mse'}, where x0_mse is the mean squared
      error of the x0 estimate derived from the predicted v.

    Raises:
      ValueError: if a probability is outside [0, 1] or the batch is malformed.
    """
    _check_loss_inputs(batch, self_cond_prob, label_dropout)
    latents = batch["latents"].astype(jnp.float32)
    labels = batch["label"].astype(jnp.int32)
    batch_size = latents.shape[0]
    time_key, noise_key, dropout_key, self_cond_key = jax.random.split(rng, 4)

    times = jax.random.uniform(time_key, (batch_size,))
    eps = jax.random.normal(noise_key, latents.shape, latents.dtype)
    alpha, sigma = alpha_sigma(schedule, times)
    x_t = diffuse(latents, eps, alpha, sigma)
    v_target = v_from_x0_eps(latents, eps, alpha, sigma)

    drop = jax.random.uniform(dropout_key, (batch_size,)) < label_dropout
    labels = jnp.where(drop, model.null_label, labels)

    self_cond = None
    if model.self_condition and self_cond_prob > 0.0:
        use_estimate = jax.random.uniform(self_cond_key, ()) < self_cond_prob
        self_cond = _self_condition_estimate(model, x_t, times, labels, use_estimate, alpha, sigma)

    v_pred = model(x_t, times, labels, self_cond)
    loss = jnp.mean((v_pred - v_target) ** 2)
    x0_pred = x0_from_v(x_t, v_pred, alpha, sigma)
    metrics = {"loss": loss, "x0_mse": jnp.mean((x0_pred - latents) ** 2)}
    return loss, metrics


def _check_loss_inputs(batch, self_cond_prob, label_dropout) -> None:
    for name, value in (("self_cond_prob", self_cond_prob), ("label_dropout", label_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} is not a probability: use a value in [0, 1].")
    if "latents" not in batch or "label" not in batch:
        raise ValueError(f"batch has keys {sorted(batch)}, expected 'latents' and 'label'.")
    latents, labels = batch["latents"], batch["label"]
    if latents.ndim != 5 or labels.shape != latents.shape[:1]:
        raise ValueError(
            f"batch['latents'] {latents.shape} must be (B, t, h, w, C) and batch['label'] "
            f"{labels.shape} must be (B,)."
        )
