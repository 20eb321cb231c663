"""Optimizer and learning-rate schedule built from the config's `optimizer` section."""

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak rate, then cosine decay to `end_learning_rate_factor` of it."""
  warmup = min(opt.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_factor)


def _decay_mask(params):
  # Weight decay on kernels and embedding tables only, not on biases and norm scales.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping."""
  schedule = learning_rate_schedule(opt, num_steps)
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                  mask=_decay_mask))


def update_ema(ema, params, decay: float):
  """Exponential moving average of the parameters, kept in float32."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
