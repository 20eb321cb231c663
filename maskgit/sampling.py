"""Iterative parallel decoding (MaskGIT) with classifier-free guidance.

Decoding starts from an all-masked grid. At each of T steps the model predicts every position
and a token is sampled at every masked position. The least confident samples are then masked
again, so the number of masked tokens follows the mask schedule down to 0 after the last step.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from maskgit import factorization
from maskgit import schedule as mask_schedule
from maskgit.model import MaskGitTransformer


def guided_logits(model: MaskGitTransformer, tokens: jax.Array, labels: jax.Array,
                  guidance_scale: float | jax.Array) -> jax.Array:
    """Compute classifier-free guided logits: uncond + scale * (cond - uncond).

    Scale 1 returns the conditional logits, 0 the unconditional ones, and larger scales push
    samples towards the class. Both passes run as one batch of size 2B.

    Args:
        model: A `MaskGitTransformer` (called without dropout).
        tokens: int32 (B, seq_len) or (B, t, h, w) token ids, with the mask id at masked positions.
        labels: int32 (B,) class labels.
        guidance_scale: Guidance scale, a float or a scalar array.

    Returns:
        float32 group logits (B, seq_len, G, 2^(K/G)).
    """
    batch = tokens.shape[0]
    null_labels = jnp.full_like(labels, model.null_class)
    logits = model(jnp.concatenate([tokens, tokens]), jnp.concatenate([labels, null_labels]))
    conditional, unconditional = logits[:batch], logits[batch:]
    return unconditional + guidance_scale * (conditional - unconditional)


def sample_tokens(group_logits: jax.Array, rng: jax.Array, *, bits: int,
                  groups: int) -> tuple[jax.Array, jax.Array]:
    """Sample a token at every position, each group independently.

    Args:
        group_logits: float (..., G, 2^(K/G)) logits.
        rng: PRNG key.
        bits: Codebook bits K.
        groups: Number of groups G.

    Returns:
        (tokens, log_prob): int32 token ids (...) in [0, 2^K), and float32 (...) log-probability
        of each sampled token, the sum of its groups' log-probabilities.
    """
    # The heads have no mask logit, so every sampled id is a real token.
    group_ids = jax.random.categorical(rng, group_logits.astype(jnp.float32), axis=-1)
    log_prob = factorization.token_log_prob(group_logits, group_ids)
    return factorization.merge_ids(group_ids, bits, groups), log_prob


def remask_least_confident(confidence: jax.Array, is_masked: jax.Array,
                           masked_after: jax.Array) -> jax.Array:
    """Choose, per row, the `masked_after` masked positions with the lowest confidence.

    Args:
        confidence: float (B, L).
        is_masked: bool (B, L), True where the position was masked before this step.
        masked_after: int scalar, at most the number of masked positions in each row.

    Returns:
        bool (B, L), True at the positions that stay masked. Only positions where `is_masked`
        is True are chosen, even when a confidence is NaN.
    """
    confidence = jnp.where(is_masked, confidence, jnp.inf)
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    return (ranks < masked_after) & is_masked


def decode_step(group_logits: jax.Array, tokens: jax.Array, rng: jax.Array, *,
                masked_after: jax.Array, mask_id: int, bits: int, groups: int,
                confidence_temperature: float | jax.Array) -> jax.Array:
    """Run one decoding step: sample masked positions, then re-mask the least confident.

    Confidence is the log-probability of the sampled token plus Gumbel noise scaled by
    `confidence_temperature`. Revealed tokens are kept as they are.

    Args:
        group_logits: float (B, L, G, 2^(K/G)) logits for every position.
        tokens: int32 (B, L) current tokens, `mask_id` where still masked.
        rng: PRNG key.
        masked_after: int scalar, how many tokens stay masked after this step. It must be
            smaller than the number masked now, which `decoding_masked_counts` ensures.
        mask_id: Token mask id, 2^K.
        bits: Codebook bits K.
        groups: Number of groups G.
        confidence_temperature: Scale of the Gumbel noise added to the confidence.

    Returns:
        int32 (B, L) tokens after the step.
    """
    sample_rng, gumbel_rng = jax.random.split(rng)
    sampled, log_prob = sample_tokens(group_logits, sample_rng, bits=bits, groups=groups)

    is_masked = tokens == mask_id
    gumbel = jax.random.gumbel(gumbel_rng, log_prob.shape)
    confidence = log_prob + confidence_temperature * gumbel
    remask = remask_least_confident(confidence, is_masked, masked_after)

    tokens = jnp.where(is_masked, sampled, tokens)
    return jnp.where(remask, mask_id, tokens)


def sample(model: MaskGitTransformer, *, labels: jax.Array, shape: tuple[int, int, int],
           num_steps: int, rng: jax.Array, guidance_scale: float | jax.Array = 1.0,
           temperature: float | jax.Array = 4.5, schedule: str = "cosine",
           return_history: bool = False):
    """Generate token grids by iterative parallel decoding.

    After step s (0-indexed) `decoding_masked_counts(...)[s]` tokens stay masked, so the count
    follows the schedule, every step reveals at least one token and the last step reveals the
    rest. The confidence noise at step s is scaled by temperature * (1 - s / num_steps), so
    early steps pick positions more randomly than late ones. The step loop is a `lax.scan`. To
    compile the whole call, wrap it in `nnx.jit` with `shape`, `num_steps`, `schedule` and
    `return_history` static.

    Args:
        model: A `MaskGitTransformer`.
        labels: int32 (B,) class labels. Pass `model.null_class` for unconditional samples.
        shape: Latent grid (t, h, w) with t * h * w == model.seq_len.
        num_steps: Number of decoding steps T, in [1, t * h * w].
        rng: PRNG key.
        guidance_scale: Classifier-free guidance scale. Scale 1 is plain conditional sampling.
        temperature: Initial scale of the Gumbel noise on the confidence. The default 4.5 is
            the choice temperature common in MaskGIT implementations. Temperature 0 picks
            purely by confidence.
        schedule: Mask schedule name, "cosine" or "linear".
        return_history: Also return the token grid after every step.

    Returns:
        int32 tokens (B, t, h, w) in [0, 2^K). With `return_history`, the pair
        (tokens, history), where history is int32 (T, B, t, h, w) and history[-1] == tokens.
    """
    seq_len = shape[0] * shape[1] * shape[2]
    if seq_len != model.seq_len:
        raise ValueError(
            f"shape={tuple(shape)} has {seq_len} tokens but the model has seq_len="
            f"{model.seq_len}. Pass the latent grid shape the model was built for."
        )
    masked_counts = jnp.asarray(mask_schedule.decoding_masked_counts(seq_len, num_steps, schedule))
    batch = labels.shape[0]
    graphdef, state = nnx.split(model)

    def decode(tokens, step_inputs):
        step, step_rng, masked_after = step_inputs
        step_model = nnx.merge(graphdef, state)
        logits = guided_logits(step_model, tokens, labels, guidance_scale)
        annealed = temperature * (1.0 - step.astype(jnp.float32) / num_steps)
        tokens = decode_step(
            logits, tokens, step_rng, masked_after=masked_after, mask_id=step_model.mask_id,
            bits=step_model.codebook_bits, groups=step_model.factor_groups,
            confidence_temperature=annealed)
        return tokens, (tokens if return_history else None)

    initial = jnp.full((batch, seq_len), model.mask_id, jnp.int32)
    step_inputs = (jnp.arange(num_steps), jax.random.split(rng, num_steps), masked_counts)
    tokens, history = jax.lax.scan(decode, initial, step_inputs)

    tokens = tokens.reshape(batch, *shape)
    if not return_history:
        return tokens
    return tokens, history.reshape(num_steps, batch, *shape)
