"""WALT-style window attention transformer that predicts the diffusion velocity v of video latents.

The design follows W.A.L.T (Gupta et al., "Photorealistic Video Generation with Diffusion Models",
arXiv:2312.06662), which has no public code: latents are cut into spatial patches, and transformer
blocks alternate between spatial window attention (each frame attends within itself) and
spatiotemporal window attention. Blocks are conditioned on the diffusion time and the class label
through AdaLN-Zero: every modulation layer and the output layer start at zero, so each block is
the identity and the model outputs zeros at initialisation.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tokdiff  # noqa: F401  (sets the flax variable-sharding option before parameters exist)
from walt.attention import WindowAttention, check_window

# Width of the sinusoidal features of the diffusion time before the time MLP.
TIME_FREQUENCY_DIM = 256


_partitioned = nnx.with_partitioning
_ZEROS = nnx.initializers.zeros_init()
_XAVIER = nnx.initializers.xavier_uniform()


def timestep_embedding(times: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Embed continuous diffusion times t in [0, 1] as (B, dim) sinusoidal features.

    Times are scaled by 1000 first so that the frequencies match those of a 1000-step discrete
    schedule. An odd `dim` gets one zero feature at the end.
    """
    half = dim // 2
    frequencies = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * times.astype(jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def _sinusoid_1d(length: int, dim: int) -> np.ndarray:
    positions = np.arange(length, dtype=np.float64)[:, None]
    frequencies = 1.0 / (10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / max(dim // 2, 1)))
    angles = positions * frequencies[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def position_embedding_3d(grid: Sequence[int], dim: int) -> np.ndarray:
    """Build a fixed sinusoidal (T, H, W, dim) position embedding.

    Each of the t, h and w axes gets an equal even share of the channels (2 * (dim // 6)), and any
    remaining channels are zero. The result is a NumPy constant, so it costs nothing under jit.
    """
    share = 2 * (dim // 6)
    (t, h, w) = grid
    parts = [
        np.broadcast_to(_sinusoid_1d(t, share)[:, None, None, :], (t, h, w, share)),
        np.broadcast_to(_sinusoid_1d(h, share)[None, :, None, :], (t, h, w, share)),
        np.broadcast_to(_sinusoid_1d(w, share)[None, None, :, :], (t, h, w, share)),
        np.zeros((t, h, w, dim - 3 * share)),
    ]
    return np.concatenate(parts, axis=-1).astype(np.float32)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    # shift and scale are (B, D) and apply to every token of their sample.
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return x * (1.0 + scale[expand]) + shift[expand]


def _gate(x: jax.Array, gate: jax.Array) -> jax.Array:
    expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
    return gate[expand] * x


def _plain_layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # AdaLN supplies the scale and shift, so the norm itself has no parameters.
    return nnx.LayerNorm(dim, use_bias=False, use_scale=False, epsilon=1e-6, rngs=rngs)


class WaltBlock(nnx.Module):
    """Transformer block with window attention, a GELU MLP and AdaLN-Zero conditioning."""

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        window: Sequence[int],
        qk_norm: bool,
        rngs: nnx.Rngs,
    ):
        self.attention_norm = _plain_layer_norm(embed_dim, rngs)
        self.attention = WindowAttention(
            embed_dim=embed_dim, num_heads=num_heads, window=window, qk_norm=qk_norm, rngs=rngs
        )
        self.mlp_norm = _plain_layer_norm(embed_dim, rngs)
        self.mlp_in = nnx.Linear(
            embed_dim,
            mlp_dim,
            kernel_init=_partitioned(_XAVIER, ("embed", "mlp")),
            bias_init=_partitioned(_ZEROS, ("mlp",)),
            rngs=rngs,
        )
        self.mlp_out = nnx.Linear(
            mlp_dim,
            embed_dim,
            kernel_init=_partitioned(_XAVIER, ("mlp", "embed")),
            bias_init=_partitioned(_ZEROS, ("embed",)),
            rngs=rngs,
        )
        # Zero-initialised, so both gates start at zero and the block starts as the identity.
        self.modulation = nnx.Linear(
            embed_dim,
            6 * embed_dim,
            kernel_init=_partitioned(_ZEROS, ("embed", "mlp")),
            bias_init=_partitioned(_ZEROS, ("mlp",)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
        """Update tokens x (B, T, H, W, D) given the conditioning vector (B, D)."""
        modulation = self.modulation(jax.nn.silu(conditioning))
        (attn_shift, attn_scale, attn_gate, mlp_shift, mlp_scale, mlp_gate) = jnp.split(
            modulation, 6, axis=-1
        )

        attended = self.attention(_modulate(self.attention_norm(x), attn_shift, attn_scale))
        x = x + _gate(attended, attn_gate)

        hidden = jax.nn.gelu(self.mlp_in(_modulate(self.mlp_norm(x), mlp_shift, mlp_scale)))
        return x + _gate(self.mlp_out(hidden), mlp_gate)


class FinalLayer(nnx.Module):
    """AdaLN-modulated norm and a zero-initialised projection from tokens to latent patches."""

    def __init__(self, *, embed_dim: int, out_features: int, rngs: nnx.Rngs):
        self.norm = _plain_layer_norm(embed_dim, rngs)
        self.modulation = nnx.Linear(
            embed_dim,
            2 * embed_dim,
            kernel_init=_partitioned(_ZEROS, ("embed", "mlp")),
            bias_init=_partitioned(_ZEROS, ("mlp",)),
            rngs=rngs,
        )
        # The output width (patch pixels times latent channels) is small, so it stays unsharded.
        self.projection = nnx.Linear(
            embed_dim,
            out_features,
            kernel_init=_partitioned(_ZEROS, ("embed", None)),
            bias_init=_partitioned(_ZEROS, (None,)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(jax.nn.silu(conditioning)), 2, axis=-1)
        return self.projection(_modulate(self.norm(x), shift, scale))


class WaltTransformer(nnx.Module):
    """Class- and time-conditioned window attention transformer on (B, t, h, w, C) latents.

    Calling the model returns the v-prediction with the shape of the latents. Label
    `num_classes` is the null class used for classifier-free guidance (see `null_label`).
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        latent_shape: Sequence[int],
        patch_size: int = 1,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        spatial_window: Sequence[int] | None = None,
        spatiotemporal_window: Sequence[int],
        num_classes: int,
        self_condition: bool,
        qk_norm: bool = True,
        rngs: nnx.Rngs,
    ):
        """Create the transformer.

        Args:
          latent_channels: latent channels C.
          latent_shape: latent grid (t, h, w); h and w must divide by patch_size.
          patch_size: spatial patch size p. Time is not patched.
          embed_dim: token width D.
          depth: number of blocks. Even blocks (0, 2, ...) use spatial windows and odd blocks use
            spatiotemporal windows.
          num_heads: attention heads per block.
          mlp_dim: hidden width of each block's MLP.
          spatial_window: (wh, ww) window in tokens of the spatial blocks, or None for whole
            frames (window 1 x h/p x w/p).
          spatiotemporal_window: (wt, wh, ww) window in tokens of the spatiotemporal blocks.
            Sizes larger than the token grid cover the whole axis.
          num_classes: number of real classes; the embedding table has one more row for the
            null class. Use 0 for an unconditional model.
          self_condition: whether the input also takes a previous x0 estimate (2C channels).
          qk_norm: whether attention RMS-normalises queries and keys per head.
          rngs: random streams for initialisation.

        Raises:
          ValueError: on a latent shape, patch size, depth or window that does not fit.
        """
        self.latent_channels = int(latent_channels)
        self.latent_shape = _check_latent_shape(latent_shape, patch_size)
        self.patch_size = int(patch_size)
        self.num_classes = int(num_classes)
        self.self_condition = bool(self_condition)
        if depth < 1 or num_classes < 0:
            raise ValueError(
                f"Invalid depth={depth} or num_classes={num_classes}: "
                "depth must be at least 1 and num_classes at least 0."
            )

        (t, h, w) = self.latent_shape
        self.token_grid = (t, h // patch_size, w // patch_size)
        if spatial_window is not None and len(spatial_window) != 2:
            raise ValueError(
                f"spatial_window={tuple(spatial_window)} must be (wh, ww) in tokens, or None for "
                "whole frames."
            )
        spatial = (1,) + tuple(self.token_grid[1:] if spatial_window is None else spatial_window)
        windows = (check_window(spatial), check_window(spatiotemporal_window))

        in_channels = self.latent_channels * (2 if self.self_condition else 1)
        self.patch_embed = nnx.Conv(
            in_channels,
            embed_dim,
            kernel_size=(1, patch_size, patch_size),
            strides=(1, patch_size, patch_size),
            padding="VALID",
            kernel_init=_partitioned(_XAVIER, (None, None, None, "conv_in", "conv_out")),
            bias_init=_partitioned(_ZEROS, ("conv_out",)),
            rngs=rngs,
        )
        self.time_mlp_in = nnx.Linear(
            TIME_FREQUENCY_DIM,
            embed_dim,
            kernel_init=_partitioned(nnx.initializers.normal(0.02), (None, "mlp")),
            bias_init=_partitioned(_ZEROS, ("mlp",)),
            rngs=rngs,
        )
        self.time_mlp_out = nnx.Linear(
            embed_dim,
            embed_dim,
            kernel_init=_partitioned(nnx.initializers.normal(0.02), ("mlp", "embed")),
            bias_init=_partitioned(_ZEROS, ("embed",)),
            rngs=rngs,
        )
        self.class_embed = nnx.Embed(
            self.num_classes + 1,
            embed_dim,
            embedding_init=_partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )

        self.blocks = nnx.List(
            [
                WaltBlock(
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    mlp_dim=mlp_dim,
                    window=windows[index % 2],
                    qk_norm=qk_norm,
                    rngs=rngs,
                )
                for index in range(depth)
            ]
        )
        self.final_layer = FinalLayer(
            embed_dim=embed_dim,
            out_features=patch_size * patch_size * self.latent_channels,
            rngs=rngs,
        )

    @property
    def null_label(self) -> int:
        """Label of the null class, used for unconditional predictions and label dropout."""
        return self.num_classes

    def condition(self, times: jax.Array, labels: jax.Array) -> jax.Array:
        """Return the (B, D) conditioning vector for diffusion times (B,) and labels (B,)."""
        time_features = timestep_embedding(times, TIME_FREQUENCY_DIM)
        time_embedding = self.time_mlp_out(jax.nn.silu(self.time_mlp_in(time_features)))
        return time_embedding + self.class_embed(labels)

    def __call__(
        self,
        noisy_latents: jax.Array,
        times: jax.Array,
        labels: jax.Array,
        self_cond: jax.Array | None = None,
    ) -> jax.Array:
        """Predict v for noisy latents.

        Args:
          noisy_latents: x_t of shape (B, t, h, w, C).
          times: diffusion times (B,) in [0, 1].
          labels: int class labels (B,); `null_label` means no class.
          self_cond: previous x0 estimate (B, t, h, w, C), or None for zeros. Only allowed when
            the model was built with self_condition=True.

        Returns:
          The v-prediction, shape (B, t, h, w, C).
        """
        self._check_inputs(noisy_latents, times, labels, self_cond)
        if self.self_condition:
            if self_cond is None:
                self_cond = jnp.zeros_like(noisy_latents)
            noisy_latents = jnp.concatenate([noisy_latents, self_cond], axis=-1)

        tokens = self.patch_embed(noisy_latents)
        tokens = tokens + position_embedding_3d(self.token_grid, tokens.shape[-1])
        conditioning = self.condition(times, labels)
        for block in self.blocks:
            tokens = block(tokens, conditioning)

        patches = self.final_layer(tokens, conditioning)
        return self._unpatchify(patches)

    def _unpatchify(self, patches: jax.Array) -> jax.Array:
        batch = patches.shape[0]
        (t, gh, gw) = self.token_grid
        p = self.patch_size
        x = patches.reshape(batch, t, gh, gw, p, p, self.latent_channels)
        x = x.transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(batch, t, gh * p, gw * p, self.latent_channels)

    def _check_inputs(self, noisy_latents, times, labels, self_cond) -> None:
        expected = self.latent_shape + (self.latent_channels,)
        if noisy_latents.ndim != 5 or tuple(noisy_latents.shape[1:]) != expected:
            raise ValueError(
                f"noisy_latents has shape {noisy_latents.shape}, expected (B,) + {expected}."
            )
        batch = noisy_latents.shape[0]
        if times.shape != (batch,) or labels.shape != (batch,):
            raise ValueError(
                f"times {times.shape} and labels {labels.shape} must both have shape ({batch},)."
            )
        if self_cond is not None and not self.self_condition:
            raise ValueError(
                "self_cond was passed to a model built with self_condition=False: "
                "pass None or build the model with self_condition=True."
            )
        if self_cond is not None and self_cond.shape != noisy_latents.shape:
            raise ValueError(
                f"self_cond has shape {self_cond.shape}, expected {noisy_latents.shape}."
            )


def _check_latent_shape(latent_shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in latent_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"latent_shape={tuple(latent_shape)} must be three positive sizes (t, h, w).")
    if patch_size < 1 or shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(
            f"Latent size {shape[1]}x{shape[2]} does not divide by patch_size={patch_size}: "
            "choose a patch size that divides both h and w."
        )
    return shape


def count_params(model: nnx.Module) -> int:
    """Return the number of trainable parameters (elements of all nnx.Param variables)."""
    params = nnx.state(model, nnx.Param)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
