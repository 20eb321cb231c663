"""Tests of the WALT latent diffusion transformer: window attention, AdaLN-Zero, schedules,
v-prediction conversions, guidance, the DDIM sampler and a short training run."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from walt import diffusion
from walt.attention import WindowAttention, merge_windows, pad_to_window_multiple, partition_windows
from walt.diffusion import NoiseSchedule
from walt.model import WaltTransformer, count_params
from walt.sampling import ddim_time_grid, guided_velocity, sample

LATENT_SHAPE = (3, 4, 4)
CHANNELS = 6
NUM_CLASSES = 5
SCHEDULES = [
    NoiseSchedule(kind, zero_terminal_snr)
    for kind, zero_terminal_snr in itertools.product(diffusion.SCHEDULE_KINDS, (False, True))
]


def _tiny_model(seed=0, *, self_condition=True, patch_size=1, depth=2):
    return WaltTransformer(
        latent_channels=CHANNELS,
        latent_shape=LATENT_SHAPE,
        patch_size=patch_size,
        embed_dim=32,
        depth=depth,
        num_heads=4,
        mlp_dim=64,
        spatiotemporal_window=(2, 3, 3),
        num_classes=NUM_CLASSES,
        self_condition=self_condition,
        rngs=nnx.Rngs(seed),
    )


# XLA's CPU backend optimisation is off in these tests because compiling, not running,
# dominates at these sizes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fun):
    """Jit fun(module, *args), a function that reads the module but does not modify it."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
    def pure(graphdef, state, *args):
        return fun(nnx.merge(graphdef, state), *args)

    def call(module, *args):
        graphdef, state = nnx.split(module)
        return pure(graphdef, state, *args)

    return call


# Eager op-by-op execution would compile every op separately, which is far slower.
_forward = _jit(lambda model, *args: model(*args))


def _randomize_zero_params(model, seed=1):
    """Replace every all-zero parameter with small random values, so outputs depend on inputs."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    generator = np.random.default_rng(seed)
    new_leaves = [
        jnp.asarray(0.2 * generator.standard_normal(leaf.shape), leaf.dtype)
        if not np.any(np.asarray(leaf))
        else leaf
        for leaf in leaves
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new_leaves))
    return model


def _inputs(seed=0, batch=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    latents = jax.random.normal(keys[0], (batch,) + LATENT_SHAPE + (CHANNELS,))
    times = jax.random.uniform(keys[1], (batch,))
    labels = jax.random.randint(keys[2], (batch,), 0, NUM_CLASSES)
    return latents, times, labels


def _masked_reference_attention(module, x, window):
    """Attention over the flattened sequence with an explicit same-window mask."""
    batch, t, h, w, depth = x.shape
    flat = x.reshape(batch, t * h * w, depth)
    query, key, value = module.project_qkv(flat)

    coords = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    window_ids = (coords // np.asarray(window)).reshape(-1, 3)
    same_window = np.all(window_ids[:, None, :] == window_ids[None, :, :], axis=-1)
    assert not same_window.all(), "the windows must restrict attention for the test to mean anything"

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    logits = jnp.where(same_window[None, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    heads = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return module.project_out(heads).reshape(x.shape)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_window_attention_non_divisible_matches_reference(qk_norm):
    window = (2, 4, 4)
    module = WindowAttention(embed_dim=16, num_heads=2, window=window, qk_norm=qk_norm, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 5, 16))

    output = _jit(lambda module, x: module(x))(module, x)
    expected = _jit(lambda module, x: _masked_reference_attention(module, x, window))(module, x)

    chex.assert_shape(output, x.shape)
    np.testing.assert_allclose(output, expected, atol=1e-5, rtol=1e-5)


def test_partition_merge_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5, 4)).astype(np.float32)
    window = (2, 4, 4)
    padded = pad_to_window_multiple(x, window)
    windows = partition_windows(padded, window)

    np.testing.assert_array_equal(padded[:, :3, :5, :5], x)
    assert not np.any(np.asarray(padded[:, 3:]))
    assert not np.any(np.asarray(padded[:, :, 5:]))
    assert not np.any(np.asarray(padded[:, :, :, 5:]))

    chex.assert_shape(padded, (2, 4, 8, 8, 4))
    chex.assert_shape(windows, (2 * 2 * 2 * 2, 32, 4))
    chex.assert_trees_all_equal(merge_windows(windows, window, padded.shape[1:4]), padded)


def test_adaln_zero_blocks_identity_at_init():
    model = _tiny_model()
    latents, times, labels = _inputs()
    tokens = jax.random.normal(jax.random.key(3), (2,) + LATENT_SHAPE + (32,))
    conditioning = _jit(lambda model, times, labels: model.condition(times, labels))(
        model, times, labels
    )

    assert np.any(np.asarray(conditioning))
    apply_block = _jit(lambda block, tokens, conditioning: block(tokens, conditioning))
    for block in model.blocks:
        chex.assert_trees_all_equal(apply_block(block, tokens, conditioning), tokens)

    output = _forward(model, latents, times, labels, latents)
    chex.assert_shape(output, latents.shape)
    chex.assert_trees_all_equal(output, jnp.zeros_like(latents))


def test_model_uses_labels_and_self_cond():
    model = _randomize_zero_params(_tiny_model(patch_size=2))
    latents, times, labels = _inputs()

    base = _forward(model, latents, times, labels, jnp.zeros_like(latents))
    with_self_cond = _forward(model, latents, times, labels, jnp.ones_like(latents))
    other_labels = _forward(model, latents, times, (labels + 1) % NUM_CLASSES, jnp.zeros_like(latents))

    chex.assert_shape(base, latents.shape)
    chex.assert_tree_all_finite(base)
    assert not np.allclose(base, with_self_cond)
    assert not np.allclose(base, other_labels)


def test_model_rejects_invalid_config():
    with pytest.raises(ValueError, match="patch_size"):
        _tiny_model(patch_size=3)
    model = _tiny_model(self_condition=False)
    latents, times, labels = _inputs()
    with pytest.raises(ValueError, match="self_condition=False"):
        model(latents, times, labels, self_cond=latents)


def test_params_have_logical_axis_names():
    model = _tiny_model()
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = param.get_metadata().get("out_sharding")
        assert names is not None, f"{path} has no logical axis names"
        assert len(names) == param.ndim, f"{path}: names {names} for shape {param.shape}"


def test_count_params():
    assert count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0))) == 3 * 4 + 4
    one_block = count_params(_tiny_model(depth=1))
    assert count_params(_tiny_model(depth=3)) - one_block == 2 * count_params(
        _tiny_model(depth=2).blocks[1]
    )


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_schedule_edge_values_finite(schedule):
    times = jnp.array([0.0, 1e-6, 0.5, 1.0 - 1e-6, 1.0])
    alpha, sigma = diffusion.alpha_sigma(schedule, times)
    log_snr = diffusion.log_snr(schedule, times)
    x = jnp.ones((times.shape[0], 2, 2))

    for name, value in [
        ("alpha", alpha),
        ("sigma", sigma),
        ("alpha_bar", diffusion.alpha_bar(schedule, times)),
        ("log_snr", log_snr),
        ("x0_from_v", diffusion.x0_from_v(x, x, alpha, sigma)),
        ("eps_from_v", diffusion.eps_from_v(x, x, alpha, sigma)),
        ("v_from_x0", diffusion.v_from_x0(x, 0.5 * x, alpha, sigma)),
        ("v_from_eps", diffusion.v_from_eps(x, 0.5 * x, alpha, sigma)),
    ]:
        assert np.all(np.isfinite(value)), f"{name} is not finite: {value}"
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(alpha[0], 1.0, atol=1e-6)
    assert np.all(np.diff(np.asarray(log_snr)) <= 0), f"logSNR increases: {log_snr}"


@pytest.mark.parametrize("kind", diffusion.SCHEDULE_KINDS)
def test_zero_terminal_snr_rescale(kind):
    plain = NoiseSchedule(kind, zero_terminal_snr=False)
    rescaled = NoiseSchedule(kind, zero_terminal_snr=True)
    alpha_end, sigma_end = diffusion.alpha_sigma(rescaled, 1.0)

    assert float(alpha_end) == 0.0
    assert float(alpha_end**2 / sigma_end**2) == 0.0
    assert float(diffusion.log_snr(rescaled, 1.0)) == -diffusion.LOG_SNR_LIMIT
    np.testing.assert_allclose(
        diffusion.alpha_sigma(rescaled, 0.0)[0], diffusion.alpha_sigma(plain, 0.0)[0]
    )
    if kind == "linear":
        # The linear schedule ends at alpha_bar = exp(-10.05), so the rescale must change it.
        assert float(diffusion.alpha_sigma(plain, 1.0)[0]) > 1e-3


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_v_conversions_round_trip(schedule):
    keys = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(keys[0], (4, 2, 3, 3, 2))
    eps = jax.random.normal(keys[1], x0.shape)
    alpha, sigma = diffusion.alpha_sigma(schedule, jnp.array([0.05, 0.3, 0.7, 0.95]))
    x_t = diffusion.diffuse(x0, eps, alpha, sigma)
    v = diffusion.v_from_x0_eps(x0, eps, alpha, sigma)

    np.testing.assert_allclose(diffusion.x0_from_v(x_t, v, alpha, sigma), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5)
    np.testing.assert_allclose(diffusion.v_from_x0(x_t, x0, alpha, sigma), v, atol=1e-4)
    np.testing.assert_allclose(diffusion.v_from_eps(x_t, eps, alpha, sigma), v, atol=1e-4)


def test_guidance_scale_limits():
    model = _randomize_zero_params(_tiny_model(self_condition=False))
    latents, times, labels = _inputs()
    null_labels = jnp.full_like(labels, model.null_label)
    v_cond = _forward(model, latents, times, labels)
    v_uncond = _forward(model, latents, times, null_labels)

    guided_jit = _jit(
        lambda model, scale: guided_velocity(model, latents, times, labels, guidance_scale=scale)
    )

    def guided(scale):
        return guided_jit(model, jnp.float32(scale))

    assert not np.allclose(v_cond, v_uncond, atol=1e-3)
    np.testing.assert_allclose(guided(1.0), v_cond, atol=1e-5)
    np.testing.assert_allclose(guided(0.0), v_uncond, atol=1e-5)
    np.testing.assert_allclose(guided(3.0), v_uncond + 3.0 * (v_cond - v_uncond), atol=1e-4)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_ddim_time_grid(num_steps):
    grid = ddim_time_grid(num_steps)

    chex.assert_shape(grid, (num_steps + 1,))
    assert float(grid[0]) == 1.0
    assert float(grid[-1]) == 0.0
    assert np.all(np.diff(np.asarray(grid)) < 0)


def test_sampler_follows_ddim_grid():
    model = _randomize_zero_params(_tiny_model(self_condition=True))
    schedule = NoiseSchedule("linear", zero_terminal_snr=True)
    labels = jnp.array([0, 3])
    shape = (2,) + LATENT_SHAPE + (CHANNELS,)
    rng = jax.random.key(7)

    # Reference: two DDIM steps 1 -> 0.5 -> 0 written out, with self-conditioning.
    x = jax.random.normal(rng, shape)
    x0 = jnp.zeros_like(x)
    for t_now, t_next in [(1.0, 0.5), (0.5, 0.0)]:
        v = _forward(model, x, jnp.full((2,), t_now), labels, x0)
        alpha, sigma = diffusion.alpha_sigma(schedule, t_now)
        x0 = diffusion.x0_from_v(x, v, alpha, sigma)
        eps = diffusion.eps_from_v(x, v, alpha, sigma)
        alpha_next, sigma_next = diffusion.alpha_sigma(schedule, t_next)
        x = alpha_next * x0 + sigma_next * eps

    # Jitted as a whole, which also checks that the sampler traces (lax.scan, no Python loop
    # over traced values).
    def run_sampler(model, labels, rng, shape):
        return sample(
            model,
            labels=labels,
            shape=shape,
            num_steps=2,
            rng=rng,
            guidance_scale=1.0,
            schedule=schedule,
        )

    latents = _jit(lambda model, labels, rng: run_sampler(model, labels, rng, shape))(
        model, labels, rng
    )
    per_sample_shape = _jit(lambda model, labels, rng: run_sampler(model, labels, rng, shape[1:]))(
        model, labels, rng
    )

    chex.assert_shape(latents, shape)
    np.testing.assert_allclose(latents, x, atol=1e-4)
    np.testing.assert_allclose(per_sample_shape, latents, atol=1e-6)


def test_training_reduces_loss():
    model = _tiny_model(seed=0)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    latents = jnp.sign(jax.random.normal(jax.random.key(0), (4,) + LATENT_SHAPE + (CHANNELS,)))
    batch = {"latents": latents, "label": jnp.array([0, 1, 2, 3], jnp.int32)}
    # A fixed key also fixes the times and noise, so the loss measures fitting one batch.
    # self_cond_prob=1 runs the gradient-free first pass on every step.
    rng = jax.random.key(5)
    loss_kwargs = dict(schedule=NoiseSchedule("cosine"), self_cond_prob=1.0, label_dropout=0.25)
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def train_step(state):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return diffusion.diffusion_loss(model, batch, rng, **loss_kwargs)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return metrics, nnx.state((model, optimizer))

    losses = []
    for _ in range(20):
        metrics, state = train_step(state)
        chex.assert_tree_all_finite(metrics)
        losses.append(float(metrics["loss"]))

    assert losses[-1] < 0.85 * losses[0], f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}"
