"""Window partitioning and masked multi-head window attention on (B, T, H, W, D) token grids.

A window of size (wt, wh, ww) splits the token grid into non-overlapping blocks, and each token
attends only to the tokens of its own block. When a grid size does not divide by the window, the
grid is zero-padded at the end of that axis to a multiple of the window. Padded positions are
never attended as keys, and their outputs are cropped away, so the result equals attention
restricted to each window's real tokens.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tokdiff  # noqa: F401  (sets the flax variable-sharding option before parameters exist)

Window = tuple[int, int, int]


def check_window(window: Sequence[int]) -> Window:
    """Return window as a tuple of three ints after checking that each size is at least 1.

    Raises:
      ValueError: if the window does not have three positive sizes.
    """
    if len(window) != 3 or any(int(size) < 1 for size in window):
        raise ValueError(
            f"Invalid attention window {tuple(window)}: expected three positive sizes (wt, wh, ww)."
        )
    return tuple(int(size) for size in window)


def clip_window(window: Window, grid: Sequence[int]) -> Window:
    """Clip a (wt, wh, ww) window to a (T, H, W) grid.

    A window larger than the grid along an axis covers that whole axis, and clipping it avoids
    padding that would only add masked tokens.
    """
    return tuple(min(size, int(extent)) for size, extent in zip(window, grid))


def padded_grid(grid: Sequence[int], window: Window) -> Window:
    """Return the grid size rounded up to a multiple of the window along each axis."""
    return tuple(-(-extent // size) * size for extent, size in zip(grid, window))


def pad_to_window_multiple(x: jax.Array, window: Window) -> jax.Array:
    """Zero-pad the (T, H, W) axes of x (B, T, H, W, D) at their ends to multiples of window."""
    grid = x.shape[1:4]
    target = padded_grid(grid, window)
    pad_widths = [(0, 0)] + [(0, t - g) for g, t in zip(grid, target)] + [(0, 0)]
    return jnp.pad(x, pad_widths)


def partition_windows(x: jax.Array, window: Window) -> jax.Array:
    """Split x (B, T, H, W, D) into windows of shape (B * num_windows, wt * wh * ww, D).

    Windows are ordered batch-major, then by their (t, h, w) window index. Tokens inside a window
    are in row-major (t, h, w) order. Works on NumPy arrays too, which builds masks as constants.

    Raises:
      ValueError: if a grid size does not divide by the window; pad first with
        `pad_to_window_multiple`.
    """
    batch, *grid, depth = x.shape
    if any(extent % size for extent, size in zip(grid, window)):
        raise ValueError(
            f"Grid {tuple(grid)} does not divide by window {window}: "
            "call pad_to_window_multiple first."
        )
    (wt, wh, ww) = window
    (nt, nh, nw) = (grid[0] // wt, grid[1] // wh, grid[2] // ww)
    x = x.reshape(batch, nt, wt, nh, wh, nw, ww, depth)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(batch * nt * nh * nw, wt * wh * ww, depth)


def merge_windows(windows: jax.Array, window: Window, grid: Sequence[int]) -> jax.Array:
    """Invert `partition_windows`: (B * num_windows, L, D) back to (B, T, H, W, D).

    Args:
      windows: window tokens as produced by `partition_windows`.
      window: the (wt, wh, ww) window used to partition.
      grid: the (T, H, W) grid that was partitioned (a multiple of the window).

    Returns:
      The token grid of shape (B, T, H, W, D).
    """
    (wt, wh, ww) = window
    (nt, nh, nw) = (grid[0] // wt, grid[1] // wh, grid[2] // ww)
    depth = windows.shape[-1]
    x = windows.reshape(-1, nt, nh, nw, wt, wh, ww, depth)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, nt * wt, nh * wh, nw * ww, depth)


def window_key_mask(grid: Sequence[int], window: Window) -> np.ndarray | None:
    """Build the real-token mask of every window of one padded grid.

    Args:
      grid: the unpadded (T, H, W) token grid.
      window: the (wt, wh, ww) window.

    Returns:
      A boolean array (num_windows, wt * wh * ww), True at real tokens and False at padding, in
      the order of `partition_windows`. None when the grid divides by the window, because then no
      token is padding.
    """
    target = padded_grid(grid, window)
    if tuple(target) == tuple(grid):
        return None

    valid = np.zeros(target, dtype=bool)
    valid[: grid[0], : grid[1], : grid[2]] = True
    # NumPy keeps the mask a compile-time constant under jit.
    return partition_windows(valid[None, ..., None], window)[..., 0]


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array | None
) -> jax.Array:
    """Compute softmax attention on (N, L, heads, head_dim) inputs, ignoring masked keys.

    Args:
      query: queries (N, L, heads, head_dim).
      key: keys (N, L, heads, head_dim).
      value: values (N, L, heads, head_dim).
      key_mask: optional boolean (N, L), False at keys that must receive zero weight. Every row
        needs at least one True entry. That is true for every window, because the padding along
        each axis is shorter than the window.

    Returns:
      The attention output (N, L, heads, head_dim).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside non-overlapping 3D windows of a (B, T, H, W, D) grid.

    The query, key and value projections have no bias. With `qk_norm`, queries and keys are
    RMS-normalised per head before the dot product, which limits the growth of attention logits
    during training.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        window: Sequence[int],
        qk_norm: bool = True,
        rngs: nnx.Rngs,
    ):
        """Create the projections.

        Args:
          embed_dim: token width D; must divide by num_heads.
          num_heads: number of attention heads.
          window: (wt, wh, ww) window in tokens. Sizes larger than the grid at call time cover the
            whole axis.
          qk_norm: whether to RMS-normalise queries and keys per head.
          rngs: random streams for initialisation.

        Raises:
          ValueError: if embed_dim does not divide by num_heads or the window is invalid.
        """
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} does not divide by num_heads={num_heads}: "
                "choose a head count that divides the width."
            )
        self.window = check_window(window)
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads

        kernel_init = nnx.initializers.xavier_uniform()
        qkv_init = nnx.with_partitioning(kernel_init, ("embed", "heads"))
        self.query = nnx.Linear(embed_dim, embed_dim, use_bias=False, kernel_init=qkv_init, rngs=rngs)
        self.key = nnx.Linear(embed_dim, embed_dim, use_bias=False, kernel_init=qkv_init, rngs=rngs)
        self.value = nnx.Linear(embed_dim, embed_dim, use_bias=False, kernel_init=qkv_init, rngs=rngs)
        self.out = nnx.Linear(
            embed_dim,
            embed_dim,
            kernel_init=nnx.with_partitioning(kernel_init, ("heads", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )

        if qk_norm:
            scale_init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
            self.query_norm = nnx.RMSNorm(self.head_dim, scale_init=scale_init, rngs=rngs)
            self.key_norm = nnx.RMSNorm(self.head_dim, scale_init=scale_init, rngs=rngs)
        else:
            self.query_norm = nnx.data(None)
            self.key_norm = nnx.data(None)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project tokens (..., D) to per-head queries, keys and values (..., heads, head_dim)."""
        split = x.shape[:-1] + (self.num_heads, self.head_dim)
        query = self.query(x).reshape(split)
        key = self.key(x).reshape(split)
        value = self.value(x).reshape(split)
        if self.query_norm is not None:
            query = self.query_norm(query)
            key = self.key_norm(key)
        return query, key, value

    def project_out(self, heads: jax.Array) -> jax.Array:
        """Merge per-head outputs (..., heads, head_dim) and project them back to (..., D)."""
        merged = heads.reshape(heads.shape[:-2] + (self.num_heads * self.head_dim,))
        return self.out(merged)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend within each window of x (B, T, H, W, D); returns the same shape."""
        batch, *grid, depth = x.shape
        window = clip_window(self.window, grid)
        target = padded_grid(grid, window)

        windows = partition_windows(pad_to_window_multiple(x, window), window)
        query, key, value = self.project_qkv(windows)

        key_mask = window_key_mask(grid, window)
        if key_mask is not None:
            # Every batch element has the same padding layout, so tile the per-window mask.
            key_mask = jnp.tile(jnp.asarray(key_mask), (batch, 1))

        attended = self.project_out(dot_product_attention(query, key, value, key_mask))
        merged = merge_windows(attended, window, target)
        return merged[:, : grid[0], : grid[1], : grid[2], :]
