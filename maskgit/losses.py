"""MaskGIT training loss: mask a schedule-drawn fraction of tokens and predict them."""

import jax
import jax.numpy as jnp
import optax

from maskgit import factorization
from maskgit import schedule as mask_schedule
from maskgit.model import MaskGitTransformer


def token_mask_from_counts(rng: jax.Array, counts: jax.Array, seq_len: int) -> jax.Array:
    """Choose `counts[b]` distinct positions of sample b uniformly at random.

    Args:
        rng: PRNG key.
        counts: int (B,) number of positions to mask per sample, in [0, seq_len].
        seq_len: Sequence length L.

    Returns:
        bool (B, L) mask, True at the chosen positions, with exactly counts[b] per row.
    """
    scores = jax.random.uniform(rng, (counts.shape[0], seq_len))
    # Rank the scores within each row, then mask the `counts` lowest ranks.
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return ranks < counts[:, None]


def random_token_mask(rng: jax.Array, batch_size: int, seq_len: int, *,
                      schedule: str = "cosine") -> jax.Array:
    """Draw u ~ U(0, 1) per sample and mask `num_masked(u)` random positions (at least one).

    Returns:
        bool (B, L) mask, True where the token is replaced by the mask id.
    """
    count_rng, position_rng = jax.random.split(rng)
    u = jax.random.uniform(count_rng, (batch_size,))
    counts = mask_schedule.num_masked(u, seq_len, schedule=schedule, min_count=1)
    return token_mask_from_counts(position_rng, counts, seq_len)


def masked_cross_entropy(group_logits: jax.Array, tokens: jax.Array, mask: jax.Array, *,
                         bits: int, groups: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the mean token cross-entropy over masked positions only.

    A token's cross-entropy is the sum of its G group cross-entropies, which is the token's
    negative log-likelihood under the factorized model (in nats, over a 2^K vocabulary).

    Args:
        group_logits: float (B, L, G, 2^(K/G)).
        tokens: int (B, L) target token ids in [0, 2^K).
        mask: bool (B, L), True at the positions that count.
        bits: Codebook bits K.
        groups: Number of groups G.

    Returns:
        (loss, metrics): the scalar loss and a dict with "loss", "accuracy" (all groups right)
        and "group_accuracy" over masked positions, and "mask_ratio" (masked share of tokens).
    """
    targets = factorization.split_ids(tokens, bits, groups)
    logits = group_logits.astype(jnp.float32)
    group_nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    token_nll = jnp.sum(group_nll, axis=-1)

    weights = mask.astype(jnp.float32)
    num_masked = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(token_nll * weights) / num_masked

    group_correct = jnp.argmax(logits, axis=-1) == targets
    token_correct = jnp.all(group_correct, axis=-1)
    metrics = {
        "loss": loss,
        "accuracy": jnp.sum(token_correct * weights) / num_masked,
        "group_accuracy": jnp.sum(jnp.mean(group_correct, axis=-1) * weights) / num_masked,
        "mask_ratio": jnp.mean(weights),
    }
    return loss, metrics


def masked_token_loss(model: MaskGitTransformer, batch: dict[str, jax.Array], rng: jax.Array, *,
                      label_dropout: float | jax.Array, schedule: str = "cosine",
                      dropout: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the MaskGIT loss of `model` on one batch.

    Each sample gets a cosine-scheduled (by default) share of its tokens replaced by the mask id,
    at least one. Its label is replaced by the null class with probability `label_dropout`, so
    the model also learns the unconditional distribution for classifier-free guidance. The loss
    is the token cross-entropy averaged over masked positions only.

    Args:
        model: A `MaskGitTransformer`.
        batch: {"tokens": int32 (B, t, h, w) ids in [0, 2^K), "label": int32 (B,)}.
        rng: PRNG key for the mask, the label dropout and the model's dropout.
        label_dropout: Probability in [0, 1] of replacing a label with the null class, a float
            or a scalar array.
        schedule: Mask schedule name, "cosine" or "linear".
        dropout: Whether the model's dropout layers are on.

    Returns:
        (loss, metrics) as from `masked_cross_entropy`.
    """
    # A traced label_dropout (e.g. a jit argument) cannot be checked here.
    if isinstance(label_dropout, (int, float)) and not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}.")
    mask_rng, label_rng, dropout_rng = jax.random.split(rng, 3)
    tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
    batch_size, seq_len = tokens.shape

    mask = random_token_mask(mask_rng, batch_size, seq_len, schedule=schedule)
    inputs = jnp.where(mask, model.mask_id, tokens)

    drop_label = jax.random.bernoulli(label_rng, label_dropout, (batch_size,))
    labels = jnp.where(drop_label, model.null_class, batch["label"])

    logits = model(inputs, labels, dropout_rng=dropout_rng if dropout else None)
    return masked_cross_entropy(
        logits, tokens, mask, bits=model.codebook_bits, groups=model.factor_groups)
