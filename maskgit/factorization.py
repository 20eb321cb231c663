"""MAGVIT-v2 token factorization: a K-bit LFQ token as G sub-tokens of K/G bits each.

With lookup-free quantization a token id is the integer whose K bits are the signs of K latent
channels, so the vocabulary is 2^K (2^18 in MAGVIT-v2). Splitting the bits into G groups gives
each group a 2^(K/G) vocabulary with its own embedding table and output head, so the model never
needs a 2^K-way softmax. Group g contains bits [g * K/G, (g + 1) * K/G) of the id, least
significant first. The model treats the groups as independent given its input, so the
log-probability of a token is the sum of its groups' log-probabilities. G = 1 is plain MaskGIT.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import tokdiff  # noqa: F401  (sets flax_always_shard_variable before parameters exist)


def group_bits(bits: int, groups: int) -> int:
    """Check that G divides K and return the number of bits per group, K / G."""
    if bits < 1 or groups < 1:
        raise ValueError(f"bits and groups must be positive, got bits={bits}, groups={groups}.")
    if bits % groups != 0:
        raise ValueError(
            f"groups={groups} must divide codebook bits={bits}. Pick a divisor of {bits}."
        )
    return bits // groups


def group_vocab_size(bits: int, groups: int) -> int:
    """Return the real vocabulary size of one group, 2^(K/G). The group's mask id equals it."""
    return 2 ** group_bits(bits, groups)


def split_ids(ids: jax.Array, bits: int, groups: int) -> jax.Array:
    """Split K-bit token ids into G sub-token ids.

    Args:
        ids: int array of token ids in [0, 2^K), any shape.
        bits: Codebook bits K.
        groups: Number of groups G.

    Returns:
        int32 array of shape ids.shape + (G,) with entries in [0, 2^(K/G)).
    """
    width = group_bits(bits, groups)
    shifts = jnp.arange(groups, dtype=jnp.int32) * width
    ids = jnp.asarray(ids, jnp.int32)
    return (ids[..., None] >> shifts) & (2**width - 1)


def merge_ids(group_ids: jax.Array, bits: int, groups: int) -> jax.Array:
    """Merge G sub-token ids back into K-bit token ids, the inverse of `split_ids`.

    Args:
        group_ids: int array of shape (..., G) with entries in [0, 2^(K/G)).
        bits: Codebook bits K.
        groups: Number of groups G.

    Returns:
        int32 array of shape group_ids.shape[:-1] with entries in [0, 2^K).
    """
    width = group_bits(bits, groups)
    if group_ids.shape[-1] != groups:
        raise ValueError(
            f"group_ids must end in a groups axis of size {groups}, got shape {group_ids.shape}."
        )
    shifts = jnp.arange(groups, dtype=jnp.int32) * width
    return jnp.sum(jnp.asarray(group_ids, jnp.int32) << shifts, axis=-1, dtype=jnp.int32)


def split_with_mask(ids: jax.Array, bits: int, groups: int) -> jax.Array:
    """Split token ids like `split_ids`, mapping the token mask id 2^K to every group's mask id.

    Returns:
        int32 array of shape ids.shape + (G,). Masked tokens get 2^(K/G) in every group.
    """
    group_ids = split_ids(ids, bits, groups)
    is_masked = (jnp.asarray(ids) == 2**bits)[..., None]
    return jnp.where(is_masked, group_vocab_size(bits, groups), group_ids)


def token_log_prob(group_logits: jax.Array, group_ids: jax.Array) -> jax.Array:
    """Return the log-probability of tokens: the sum over groups of log_softmax at group_ids.

    Args:
        group_logits: float array (..., G, 2^(K/G)).
        group_ids: int array (..., G).

    Returns:
        float32 array (...).
    """
    log_probs = jax.nn.log_softmax(group_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, group_ids[..., None], axis=-1)[..., 0]
    return jnp.sum(picked, axis=-1)


class FactorizedEmbed(nnx.Module):
    """Token embedding as the sum of G group embeddings, each over 2^(K/G) ids plus a mask id."""

    def __init__(self, *, bits: int, groups: int, embed_dim: int, rngs: nnx.Rngs):
        self.bits = bits
        self.groups = groups
        rows = group_vocab_size(bits, groups) + 1  # The last row embeds the group's mask id.
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "vocab", "embed"))
        self.embedding = nnx.Param(init(rngs.params(), (groups, rows, embed_dim)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Embed token ids in [0, 2^K] (2^K is the mask id) as an array ids.shape + (D,)."""
        group_ids = split_with_mask(ids, self.bits, self.groups)
        table = self.embedding[...]
        per_group = [table[g][group_ids[..., g]] for g in range(self.groups)]
        return sum(per_group[1:], per_group[0])


class FactorizedHead(nnx.Module):
    """G output heads, one 2^(K/G)-way classifier per group.

    The heads have no logit for the mask id, so a decoder that samples from them can never emit it.
    """

    def __init__(self, *, bits: int, groups: int, embed_dim: int, rngs: nnx.Rngs):
        vocab = group_vocab_size(bits, groups)
        kernel_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed", "vocab"))
        bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "vocab"))
        self.kernel = nnx.Param(kernel_init(rngs.params(), (groups, embed_dim, vocab)))
        self.bias = nnx.Param(bias_init(rngs.params(), (groups, vocab)))

    def __call__(self, features: jax.Array) -> jax.Array:
        """Map features (..., D) to group logits (..., G, 2^(K/G))."""
        logits = jnp.einsum("...d,gdv->...gv", features, self.kernel[...])
        return logits + self.bias[...]
