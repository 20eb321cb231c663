"""Tests for the MaskGIT token transformer: schedules, factorization, loss, decoding, guidance."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maskgit import factorization, losses, sampling
from maskgit import schedule as mask_schedule
from maskgit.model import MaskGitTransformer, count_params

BITS = 6
GROUPS = 2
NUM_CLASSES = 3
GRID = (2, 4, 4)
SEQ_LEN = GRID[0] * GRID[1] * GRID[2]
EMBED_DIM = 32
DEPTH = 2
NUM_HEADS = 4
MLP_DIM = 64


def _build_model(seed: int = 0, *, bits: int = BITS, groups: int = GROUPS,
                 dropout: float = 0.0) -> MaskGitTransformer:
    return MaskGitTransformer(
        codebook_bits=bits, factor_groups=groups, num_classes=NUM_CLASSES, seq_len=SEQ_LEN,
        embed_dim=EMBED_DIM, depth=DEPTH, num_heads=NUM_HEADS, mlp_dim=MLP_DIM,
        dropout=dropout, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model() -> MaskGitTransformer:
    return _build_model()


def _random_batch(seed: int, batch_size: int = 4) -> dict[str, jax.Array]:
    generator = np.random.default_rng(seed)
    tokens = generator.integers(0, 2**BITS, size=(batch_size, *GRID))
    labels = generator.integers(0, NUM_CLASSES, size=(batch_size,))
    return {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(labels, jnp.int32)}


# Jitted once and shared between tests, because compiling dominates the run time on CPU.
_forward = nnx.jit(lambda model, tokens, labels: model(tokens, labels))
_guided_logits = nnx.jit(sampling.guided_logits)
_cross_entropy = jax.jit(losses.masked_cross_entropy, static_argnames=("bits", "groups"))
_token_loss = nnx.jit(losses.masked_token_loss, static_argnames=("schedule", "dropout"))
_sample = nnx.jit(sampling.sample,
                  static_argnames=("shape", "num_steps", "schedule", "return_history"))


# Mask schedules.


def test_mask_ratio_cosine_and_linear_values():
    u = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(mask_schedule.mask_ratio(u), np.cos(0.5 * np.pi * u), atol=1e-7)
    np.testing.assert_allclose(mask_schedule.mask_ratio(u, "linear"), 1.0 - u, atol=1e-7)
    np.testing.assert_allclose(mask_schedule.mask_ratio(jnp.asarray(u)), np.cos(0.5 * np.pi * u),
                               atol=1e-6)
    assert mask_schedule.mask_ratio(0.0) == 1.0
    assert mask_schedule.mask_ratio(jnp.float32(1.0)) >= 0.0

    with pytest.raises(ValueError, match="Unknown mask schedule"):
        mask_schedule.mask_ratio(0.5, "square")


def test_num_masked_at_least_one():
    u = jnp.linspace(0.0, 1.0, 101)
    counts = np.asarray(mask_schedule.num_masked(u, SEQ_LEN, min_count=1))
    expected = np.clip(np.floor(np.cos(0.5 * np.pi * np.asarray(u)) * SEQ_LEN), 1, SEQ_LEN)

    assert counts.min() == 1
    assert counts[0] == SEQ_LEN
    np.testing.assert_array_equal(counts, expected)


def test_token_mask_exact_counts():
    counts = jnp.array([1, 5, SEQ_LEN, 17], jnp.int32)
    mask = losses.token_mask_from_counts(jax.random.key(0), counts, SEQ_LEN)

    chex.assert_shape(mask, (4, SEQ_LEN))
    np.testing.assert_array_equal(mask.sum(axis=-1), counts)


def test_training_mask_follows_cosine():
    batch_size = 4096
    mask = losses.random_token_mask(jax.random.key(1), batch_size, SEQ_LEN)
    per_sample = np.asarray(mask.sum(axis=-1))

    assert per_sample.min() >= 1
    assert per_sample.max() <= SEQ_LEN

    # E[max(floor(cos(pi/2 u) L), 1)] / L by a fine Riemann sum. Linear masking gives ~0.5.
    u = (np.arange(100_000) + 0.5) / 100_000
    expected = np.mean(np.maximum(np.floor(np.cos(0.5 * np.pi * u) * SEQ_LEN), 1)) / SEQ_LEN
    # Standard error of the mean is about 0.3 / sqrt(4096) = 0.005.
    assert abs(per_sample.mean() / SEQ_LEN - expected) < 0.02


def test_decoding_counts_reach_zero():
    for seq_len, num_steps in [(32, 8), (32, 32), (5, 5), (100, 12), (7, 1)]:
        for name in mask_schedule.SCHEDULES:
            counts = mask_schedule.decoding_masked_counts(seq_len, num_steps, name)
            chex.assert_shape(counts, (num_steps,))
            assert counts[-1] == 0
            assert np.all(np.diff(np.concatenate([[seq_len], counts])) <= -1)

    with pytest.raises(ValueError, match="num_steps"):
        mask_schedule.decoding_masked_counts(8, 9)


# Token factorization.


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_factorization_round_trip_all_ids(groups):
    ids = jnp.arange(2**BITS, dtype=jnp.int32)
    group_ids = factorization.split_ids(ids, BITS, groups)

    chex.assert_shape(group_ids, (2**BITS, groups))
    assert int(group_ids.min()) >= 0
    assert int(group_ids.max()) < factorization.group_vocab_size(BITS, groups)
    np.testing.assert_array_equal(factorization.merge_ids(group_ids, BITS, groups), ids)
    assert len({tuple(row) for row in np.asarray(group_ids).tolist()}) == 2**BITS


def test_factorization_groups_are_bits():
    # With one bit per group, group g is bit g of the id, least significant first.
    ids = np.arange(2**BITS)
    bits = np.asarray(factorization.split_ids(jnp.asarray(ids), BITS, BITS))
    expected = np.array([[int(c) for c in reversed(np.binary_repr(i, BITS))] for i in ids])
    np.testing.assert_array_equal(bits, expected)


def test_factorization_mask_and_bad_groups():
    ids = jnp.array([0, 2**BITS, 2**BITS - 1])
    group_ids = np.asarray(factorization.split_with_mask(ids, BITS, GROUPS))
    mask_row = [factorization.group_vocab_size(BITS, GROUPS)] * GROUPS
    np.testing.assert_array_equal(group_ids[1], mask_row)
    np.testing.assert_array_equal(group_ids[2], [2 ** (BITS // GROUPS) - 1] * GROUPS)

    with pytest.raises(ValueError, match="must divide"):
        factorization.split_ids(ids, BITS, 4)


# Model.


def test_model_logits_shape_and_params(model):
    batch = _random_batch(0)
    logits = _forward(model, batch["tokens"], batch["label"])
    group_vocab = 2 ** (BITS // GROUPS)
    chex.assert_shape(logits, (4, SEQ_LEN, GROUPS, group_vocab))
    chex.assert_tree_all_finite(logits)

    block = (4 * (EMBED_DIM * EMBED_DIM + EMBED_DIM) + 4 * EMBED_DIM
             + 2 * EMBED_DIM * MLP_DIM + MLP_DIM + EMBED_DIM)
    expected = (GROUPS * (group_vocab + 1) * EMBED_DIM + (NUM_CLASSES + 1) * EMBED_DIM
                + SEQ_LEN * EMBED_DIM + DEPTH * block + 2 * EMBED_DIM
                + GROUPS * EMBED_DIM * group_vocab + GROUPS * group_vocab)
    assert count_params(model) == expected


def test_model_params_have_axis_names(model):
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for variable in leaves:
        names = variable.get_metadata().get("out_sharding")
        assert names is not None, variable
        assert len(names) == variable[...].ndim, (names, variable[...].shape)


def test_model_rejects_wrong_grid(model):
    with pytest.raises(ValueError, match="seq_len"):
        model(jnp.zeros((2, 3, 4, 4), jnp.int32), jnp.zeros((2,), jnp.int32))


# Loss.


def test_loss_ignores_unmasked_logits():
    generator = np.random.default_rng(3)
    group_vocab = 2 ** (BITS // GROUPS)
    logits = generator.normal(size=(3, SEQ_LEN, GROUPS, group_vocab)).astype(np.float32)
    tokens = generator.integers(0, 2**BITS, size=(3, SEQ_LEN))
    mask = generator.random((3, SEQ_LEN)) < 0.4
    mask[:, 0] = True
    mask[:, 1] = False

    loss, _ = _cross_entropy(logits, tokens, mask, bits=BITS, groups=GROUPS)
    noise = 10.0 * generator.normal(size=logits.shape).astype(np.float32)

    unmasked_changed = np.where(mask[..., None, None], logits, logits + noise)
    loss_unmasked, _ = _cross_entropy(unmasked_changed, tokens, mask, bits=BITS, groups=GROUPS)
    np.testing.assert_allclose(loss_unmasked, loss, rtol=1e-6)

    masked_changed = np.where(mask[..., None, None], logits + noise, logits)
    loss_masked, _ = _cross_entropy(masked_changed, tokens, mask, bits=BITS, groups=GROUPS)
    assert abs(float(loss_masked) - float(loss)) > 1e-3


def test_loss_is_token_nll_sum_over_groups():
    generator = np.random.default_rng(4)
    logits = generator.normal(size=(3, SEQ_LEN, GROUPS, 2 ** (BITS // GROUPS)))
    logits = logits.astype(np.float32)
    tokens = generator.integers(0, 2**BITS, size=(3, SEQ_LEN))
    mask = np.ones((3, SEQ_LEN), bool)

    loss, metrics = _cross_entropy(logits, tokens, mask, bits=BITS, groups=GROUPS)

    # Joint distribution over all 2^K tokens as the product of the group distributions,
    # where group g contains bits [3g, 3g + 3) of the id.
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    all_ids = np.arange(2**BITS)
    joint = sum(log_probs[..., g, (all_ids >> (3 * g)) & 7] for g in range(GROUPS))
    np.testing.assert_allclose(np.exp(joint).sum(axis=-1), 1.0, rtol=1e-6)
    expected = -np.mean(np.take_along_axis(joint, tokens[..., None], axis=-1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_ratio"], 1.0)


def test_label_dropout_uses_null_class(model):
    batch = _random_batch(6)
    rng = jax.random.key(7)

    dropped, _ = _token_loss(model, batch, rng, label_dropout=1.0, dropout=False)
    null_batch = {**batch, "label": jnp.full_like(batch["label"], NUM_CLASSES)}
    null_loss, _ = _token_loss(model, null_batch, rng, label_dropout=0.0, dropout=False)
    conditional, _ = _token_loss(model, batch, rng, label_dropout=0.0, dropout=False)

    np.testing.assert_allclose(dropped, null_loss, rtol=1e-6)
    assert abs(float(conditional) - float(dropped)) > 1e-6


def test_training_reduces_loss():
    model = _build_model(seed=1, dropout=0.1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    # Tokens that depend on position and label, so there is something to learn in a few steps.
    labels = jnp.array([0, 1, 2, 1], jnp.int32)
    positions = jnp.arange(SEQ_LEN)[None, :]
    tokens = (positions * 7 + labels[:, None] * 13) % 2**BITS
    batch = {"tokens": tokens.reshape(4, *GRID).astype(jnp.int32), "label": labels}
    rng = jax.random.key(9)

    @nnx.jit
    def train_step(model, optimizer, batch, rng):
        def loss_fn(model):
            return losses.masked_token_loss(model, batch, rng, label_dropout=0.1)

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    initial, _ = _token_loss(model, batch, rng, label_dropout=0.0, dropout=False)
    for step in range(15):
        train_step(model, optimizer, batch, jax.random.fold_in(rng, step))
    final, _ = _token_loss(model, batch, rng, label_dropout=0.0, dropout=False)

    assert math.isfinite(float(final))
    assert float(final) < 0.85 * float(initial), (float(initial), float(final))


# Decoding and guidance.


def test_guidance_scale_one_and_zero(model):
    batch = _random_batch(10)
    hidden = np.random.default_rng(11).random(batch["tokens"].shape) < 0.5
    tokens = jnp.where(hidden, model.mask_id, batch["tokens"])
    labels = batch["label"]
    conditional = _forward(model, tokens, labels)
    unconditional = _forward(model, tokens, jnp.full_like(labels, model.null_class))
    assert not np.allclose(conditional, unconditional, atol=1e-4)

    np.testing.assert_allclose(_guided_logits(model, tokens, labels, 1.0), conditional,
                               atol=1e-5)
    np.testing.assert_allclose(_guided_logits(model, tokens, labels, 0.0), unconditional,
                               atol=1e-5)
    guided = _guided_logits(model, tokens, labels, 3.0)
    np.testing.assert_allclose(guided, unconditional + 3.0 * (conditional - unconditional),
                               atol=1e-4)


def test_remask_picks_least_confident_masked():
    confidence = jnp.array([[0.5, -3.0, 2.0, -1.0, 0.0, 1.0]])
    is_masked = jnp.array([[True, False, True, True, True, False]])
    remask = sampling.remask_least_confident(confidence, is_masked, jnp.int32(2))
    # Position 1 has the lowest confidence but is already revealed, so it is never chosen.
    np.testing.assert_array_equal(remask, [[False, False, False, True, True, False]])


@pytest.mark.parametrize("groups,schedule", [(GROUPS, "cosine"), (1, "linear")])
def test_decoding_keeps_revealed_tokens(model, groups, schedule):
    if groups != GROUPS:
        model = _build_model(seed=2, groups=groups)
    num_steps = 8
    labels = jnp.array([0, model.null_class], jnp.int32)
    tokens, history = _sample(
        model, labels=labels, shape=GRID, num_steps=num_steps, rng=jax.random.key(12),
        guidance_scale=2.0, temperature=4.5, schedule=schedule, return_history=True)

    chex.assert_shape(tokens, (2, *GRID))
    chex.assert_shape(history, (num_steps, 2, *GRID))
    chex.assert_type(tokens, jnp.int32)
    np.testing.assert_array_equal(history[-1], tokens)
    assert not bool((tokens == model.mask_id).any())
    assert int(tokens.min()) >= 0
    assert int(tokens.max()) < 2**BITS

    history = np.asarray(history).reshape(num_steps, 2, SEQ_LEN)
    masked_counts = (history == model.mask_id).sum(axis=-1)
    u = np.arange(1, num_steps + 1) / num_steps
    ratio = np.cos(0.5 * np.pi * u) if schedule == "cosine" else 1.0 - u
    expected = np.floor(ratio * SEQ_LEN).clip(min=0)
    for row in range(2):
        np.testing.assert_array_equal(masked_counts[:, row], expected)

    for step in range(1, num_steps):
        revealed = history[step - 1] != model.mask_id
        np.testing.assert_array_equal(history[step][revealed], history[step - 1][revealed])
