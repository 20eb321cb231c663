"""Mask schedules: the fraction of tokens that stay masked, for training and for decoding.

A schedule maps u in [0, 1] to a mask ratio in [0, 1] that falls from 1 at u = 0 to 0 at u = 1.
Training draws u ~ U(0, 1) per sample and masks that fraction of the tokens. Decoding with T steps
keeps `ratio((s + 1) / T)` of the tokens masked after step s (0-indexed), so the last step
reveals everything.
"""

import math

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown mask schedule {schedule!r}. Expected one of {SCHEDULES}.")


def mask_ratio(u, schedule: str = "cosine"):
    """Compute the fraction of tokens that are masked at schedule position u.

    Args:
        u: Schedule position in [0, 1], a scalar or an array (NumPy or JAX).
        schedule: "cosine" for cos(pi/2 * u), the MaskGIT default, or "linear" for 1 - u.

    Returns:
        The mask ratio, same shape as u, clipped to [0, 1]. Clipping matters because
        cos(pi/2) is about -4e-8 in float32.
    """
    _check_schedule(schedule)
    xp = jnp if not isinstance(u, (float, int, np.ndarray, np.generic)) else np
    if schedule == "cosine":
        ratio = xp.cos(0.5 * math.pi * u)
    else:
        ratio = 1.0 - u
    return xp.clip(ratio, 0.0, 1.0)


def num_masked(u, seq_len: int, *, schedule: str = "cosine", min_count: int = 1):
    """Count the tokens to mask out of `seq_len` at schedule position u.

    The count is floor(mask_ratio(u) * seq_len), clipped to [min_count, seq_len].

    Args:
        u: Schedule position in [0, 1], a scalar or an array, e.g. one draw per sample.
        seq_len: Number of tokens in a sequence (t * h * w).
        schedule: Schedule name, see `mask_ratio`.
        min_count: Smallest count returned. Training uses 1 so that every sample has at least
            one position in the loss. Decoding uses 0 so the last step can reveal everything.

    Returns:
        int32 JAX array of counts with the shape of u.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
    if not 0 <= min_count <= seq_len:
        raise ValueError(f"min_count must lie in [0, seq_len={seq_len}], got {min_count}.")

    ratio = mask_ratio(jnp.asarray(u, jnp.float32), schedule)
    counts = jnp.floor(ratio * seq_len).astype(jnp.int32)
    return jnp.clip(counts, min_count, seq_len)


def decoding_masked_counts(seq_len: int, num_steps: int, schedule: str = "cosine") -> np.ndarray:
    """Compute how many tokens stay masked after each decoding step.

    Entry s is floor(mask_ratio((s + 1) / num_steps) * seq_len), moved by the least amount
    needed so that every step reveals at least one token. The last entry is 0.

    Args:
        seq_len: Number of tokens in a sequence (t * h * w).
        num_steps: Number of decoding steps T, between 1 and seq_len.
        schedule: Schedule name, see `mask_ratio`.

    Returns:
        int32 NumPy array of shape (num_steps,), strictly decreasing, ending at 0. The counts
        are static, so a jitted decoder can take them as constants.
    """
    _check_schedule(schedule)
    if not 1 <= num_steps <= seq_len:
        raise ValueError(
            f"num_steps must lie in [1, seq_len={seq_len}] so that each step reveals at least "
            f"one token, got {num_steps}. Use fewer steps or a longer sequence."
        )

    positions = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
    targets = np.floor(mask_ratio(positions, schedule) * seq_len).astype(np.int64)
    targets[-1] = 0  # The float ratio at u = 1 may be a rounding error above 0.

    # Keep at least one masked token for each remaining step, because rounding can otherwise
    # reach 0 early (floor((1 - 0.8) * 5) is 0 in float64) and leave a step nothing to reveal.
    counts = np.empty(num_steps, np.int64)
    previous = seq_len
    for step in range(num_steps):
        remaining_steps = num_steps - 1 - step
        counts[step] = min(max(targets[step], remaining_steps), previous - 1)
        previous = counts[step]
    return counts.astype(np.int32)
