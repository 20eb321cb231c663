"""Bidirectional transformer over masked LFQ token grids, with a class token for conditioning."""

import jax
import jax.numpy as jnp
from flax import nnx

import tokdiff  # noqa: F401  (sets flax_always_shard_variable before parameters exist)
from maskgit import factorization

_WEIGHT_INIT = nnx.initializers.normal(0.02)


def _dense(in_dim: int, out_dim: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    """Build a Linear layer whose kernel carries `names` and whose bias carries the output name."""
    return nnx.Linear(
        in_dim,
        out_dim,
        kernel_init=nnx.with_partitioning(_WEIGHT_INIT, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def _split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """Split a dropout key into `num` keys, or return `num` Nones when dropout is off."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


class SelfAttention(nnx.Module):
    """Multi-head self-attention without a mask: every token attends to every token."""

    def __init__(self, *, embed_dim: int, num_heads: int, rngs: nnx.Rngs):
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}. "
                "Change one of them."
            )
        self.num_heads = num_heads
        self.query = _dense(embed_dim, embed_dim, ("embed", "heads"), rngs)
        self.key = _dense(embed_dim, embed_dim, ("embed", "heads"), rngs)
        self.value = _dense(embed_dim, embed_dim, ("embed", "heads"), rngs)
        self.output = _dense(embed_dim, embed_dim, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        head_shape = (batch, length, self.num_heads, dim // self.num_heads)
        query = self.query(x).reshape(head_shape)
        key = self.key(x).reshape(head_shape)
        value = self.value(x).reshape(head_shape)

        attended = jax.nn.dot_product_attention(query, key, value)
        return self.output(attended.reshape(batch, length, dim))


class TransformerBlock(nnx.Module):
    """Pre-LN block: x + attention(norm(x)), then x + MLP(norm(x)), with residual dropout."""

    def __init__(self, *, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float,
                 rngs: nnx.Rngs):
        self.attention_norm = _layer_norm(embed_dim, rngs)
        self.attention = SelfAttention(embed_dim=embed_dim, num_heads=num_heads, rngs=rngs)
        self.mlp_norm = _layer_norm(embed_dim, rngs)
        self.mlp_up = _dense(embed_dim, mlp_dim, ("embed", "mlp"), rngs)
        self.mlp_down = _dense(mlp_dim, embed_dim, ("mlp", "embed"), rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        attention_rng, mlp_rng = _split_key(dropout_rng, 2)

        update = self.attention(self.attention_norm(x))
        x = x + self.dropout(update, deterministic=attention_rng is None, rngs=attention_rng)

        update = self.mlp_down(jax.nn.gelu(self.mlp_up(self.mlp_norm(x))))
        return x + self.dropout(update, deterministic=mlp_rng is None, rngs=mlp_rng)


class MaskGitTransformer(nnx.Module):
    """Bidirectional transformer that predicts every token of a partly masked token grid.

    The input is a grid of K-bit token ids in which `mask_id` = 2^K marks masked positions, plus
    one class label per sample, where `null_class` = num_classes means unconditional. The grid is
    flattened to seq_len = t * h * w tokens, each embedded as a sum of factorized group embeddings
    plus a learned position embedding. A class-embedding token is prepended and dropped again
    before the output heads.
    """

    def __init__(self, *, codebook_bits: int, factor_groups: int, num_classes: int, seq_len: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_dim: int, dropout: float,
                 rngs: nnx.Rngs):
        factorization.group_bits(codebook_bits, factor_groups)  # Raises if G does not divide K.
        if num_classes < 1 or seq_len < 1 or depth < 1:
            raise ValueError(
                f"num_classes, seq_len and depth must be positive, got num_classes={num_classes}, "
                f"seq_len={seq_len}, depth={depth}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")

        self.codebook_bits = codebook_bits
        self.factor_groups = factor_groups
        self.num_classes = num_classes
        self.seq_len = seq_len
        self.mask_id = 2**codebook_bits
        self.null_class = num_classes

        self.token_embed = factorization.FactorizedEmbed(
            bits=codebook_bits, groups=factor_groups, embed_dim=embed_dim, rngs=rngs)
        self.class_embed = nnx.Embed(
            num_classes + 1, embed_dim,
            embedding_init=nnx.with_partitioning(_WEIGHT_INIT, ("vocab", "embed")), rngs=rngs)
        position_init = nnx.with_partitioning(_WEIGHT_INIT, (None, "embed"))
        self.position_embed = nnx.Param(position_init(rngs.params(), (seq_len, embed_dim)))
        self.embed_dropout = nnx.Dropout(dropout)

        self.blocks = nnx.List([
            TransformerBlock(embed_dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                             dropout=dropout, rngs=rngs)
            for _ in range(depth)
        ])
        self.final_norm = _layer_norm(embed_dim, rngs)
        self.head = factorization.FactorizedHead(
            bits=codebook_bits, groups=factor_groups, embed_dim=embed_dim, rngs=rngs)

    def __call__(self, tokens: jax.Array, labels: jax.Array, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Compute group logits for every position.

        Args:
            tokens: int32 (B, t, h, w) or (B, seq_len) token ids in [0, 2^K], where 2^K is the
                mask id.
            labels: int32 (B,) class labels in [0, num_classes], where num_classes is the null
                class.
            dropout_rng: PRNG key that turns dropout on. None (the default) runs without dropout.

        Returns:
            float32 logits (B, seq_len, G, 2^(K/G)), one 2^(K/G)-way distribution per group.
        """
        batch = tokens.shape[0]
        tokens = tokens.reshape(batch, -1)
        if tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"Token grid has {tokens.shape[1]} positions but the model was built with "
                f"seq_len={self.seq_len}. Build it with seq_len = t * h * w of the grid."
            )
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {labels.shape}.")
        embed_rng, *block_rngs = _split_key(dropout_rng, len(self.blocks) + 1)

        x = self.token_embed(tokens) + self.position_embed[...]
        class_token = self.class_embed(labels)[:, None, :]
        x = jnp.concatenate([class_token, x], axis=1)
        x = self.embed_dropout(x, deterministic=embed_rng is None, rngs=embed_rng)

        for block, block_rng in zip(self.blocks, block_rngs):
            x = block(x, block_rng)

        x = self.final_norm(x[:, 1:])
        return self.head(x)


def count_params(model: nnx.Module) -> int:
    """Return the number of trainable parameters (nnx.Param entries) in `model`."""
    params = nnx.state(model, nnx.Param)
    return sum(leaf.size for leaf in jax.tree.leaves(params))
