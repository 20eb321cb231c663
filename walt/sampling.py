"""Deterministic DDIM sampling (eta = 0) of v-prediction models with classifier-free guidance."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from walt.diffusion import NoiseSchedule, alpha_sigma, diffuse, eps_from_v, x0_from_v


def ddim_time_grid(num_steps: int) -> jax.Array:
    """Return num_steps + 1 evenly spaced times from 1.0 (pure noise) down to 0.0 (data).

    Step i moves from grid[i] to grid[i + 1], so the grid defines exactly num_steps steps.

    Raises:
      ValueError: if num_steps is below 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1.")
    return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def guided_velocity(
    model: nnx.Module,
    noisy_latents: jax.Array,
    times: jax.Array,
    labels: jax.Array,
    *,
    guidance_scale: float | jax.Array,
    self_cond: jax.Array | None = None,
) -> jax.Array:
    """Predict v with classifier-free guidance on all latent channels.

    The conditional and unconditional (null label) predictions run as one batch of 2B and are
    combined as v = v_uncond + guidance_scale * (v_cond - v_uncond). A scale of 1 gives the
    conditional prediction and 0 the unconditional one.

    Args:
      model: a `WaltTransformer`.
      noisy_latents: x_t (B, t, h, w, C).
      times: diffusion times (B,).
      labels: int class labels (B,).
      guidance_scale: guidance weight, a Python float or a traced scalar.
      self_cond: x0 estimate (B, t, h, w, C) fed to both branches, or None.

    Returns:
      The guided v-prediction (B, t, h, w, C).
    """
    null_labels = jnp.full_like(labels, model.null_label)
    doubled_cond = None if self_cond is None else jnp.concatenate([self_cond, self_cond])
    v_both = model(
        jnp.concatenate([noisy_latents, noisy_latents]),
        jnp.concatenate([times, times]),
        jnp.concatenate([labels, null_labels]),
        doubled_cond,
    )
    v_cond, v_uncond = jnp.split(v_both, 2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def sample(
    model: nnx.Module,
    *,
    labels: jax.Array,
    shape: Sequence[int],
    num_steps: int,
    rng: jax.Array,
    guidance_scale: float | jax.Array,
    schedule: NoiseSchedule,
    clip_x0: float | None = None,
) -> jax.Array:
    """Generate latents with deterministic DDIM from pure noise at t = 1 down to t = 0.

    The initial noise is `jax.random.normal(rng, shape)`. Each of the num_steps steps (see
    `ddim_time_grid`) predicts the guided v, derives x0 and eps from it and moves to the next
    time as x = alpha' * x0 + sigma' * eps. When the model uses self-conditioning, each step
    feeds back the previous step's guided x0 estimate (zeros at the first step). The loop is a
    `lax.scan`, so the function works under `nnx.jit` with `shape`, `num_steps`, `schedule` and
    `clip_x0` static.

    Args:
      model: a `WaltTransformer`.
      labels: int class labels (B,); the model's `null_label` samples unconditionally.
      shape: output shape (B, t, h, w, C), or the per-sample shape (t, h, w, C) with B taken
        from labels.
      num_steps: number of DDIM steps, at least 1.
      rng: PRNG key of the initial noise.
      guidance_scale: classifier-free guidance weight (1 = conditional only).
      schedule: the noise schedule the model was trained with.
      clip_x0: if set, clip each x0 estimate to [-clip_x0, clip_x0], for example 1.0 for LFQ
        codes in {-1, +1}. None leaves it unbounded (normalised continuous latents).

    Returns:
      The generated latents (B, t, h, w, C) at t = 0, float32.

    Raises:
      ValueError: if shape or labels do not match or num_steps is below 1.
    """
    grid = ddim_time_grid(num_steps)
    shape = tuple(int(size) for size in shape)
    if len(shape) == 4 and labels.ndim == 1:
        shape = (labels.shape[0],) + shape
    if len(shape) != 5 or labels.shape != shape[:1]:
        raise ValueError(
            f"shape={shape} must be (B, t, h, w, C) or (t, h, w, C), and labels {labels.shape} "
            "must be (B,)."
        )

    batch = shape[0]
    graphdef, state = nnx.split(model)
    noise = jax.random.normal(rng, shape, jnp.float32)

    def step(carry, time_pair):
        x, previous_x0 = carry
        t_now, t_next = time_pair
        net = nnx.merge(graphdef, state)
        self_cond = previous_x0 if net.self_condition else None

        times = jnp.full((batch,), t_now)
        v = guided_velocity(
            net, x, times, labels, guidance_scale=guidance_scale, self_cond=self_cond
        )
        alpha, sigma = alpha_sigma(schedule, t_now)
        x0 = x0_from_v(x, v, alpha, sigma)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_v(x, v, alpha, sigma)

        alpha_next, sigma_next = alpha_sigma(schedule, t_next)
        return (diffuse(x0, eps, alpha_next, sigma_next), x0), None

    (latents, _), _ = jax.lax.scan(
        step, (noise, jnp.zeros_like(noise)), (grid[:-1], grid[1:])
    )
    return latents
