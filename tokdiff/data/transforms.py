"""Clip transforms on numpy videos: clip sampling, resize, crop, flip and scaling to [-1, 1].

Every random choice takes an explicit `np.random.Generator`, so a transform is deterministic
given its generator. Passing `rng=None` selects the evaluation behaviour (centred clip and crop,
no flip).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from tokdiff import video_io


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Shape and augmentation settings of the clips fed to a model.

  Attributes:
    num_frames: frames per clip (1 + 4k for the causal video tokenizer).
    frame_stride: step between the source frames taken into a clip.
    height: output height in pixels.
    width: output width in pixels.
    random_crop: crop at a random position (training only) instead of the centre.
    random_flip: flip horizontally with probability 1/2 (training only).
    pad_short_clips: repeat the last frame of videos shorter than `span` instead of raising.
  """

  num_frames: int
  frame_stride: int
  height: int
  width: int
  random_crop: bool = False
  random_flip: bool = False
  pad_short_clips: bool = False

  def __post_init__(self):
    for name in ("num_frames", "frame_stride", "height", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"ClipSpec.{name} must be at least 1, got {getattr(self, name)}.")

  @property
  def span(self) -> int:
    """Number of source frames that one clip covers: (num_frames - 1) * frame_stride + 1."""
    return (self.num_frames - 1) * self.frame_stride + 1


def sample_clip(
    video: np.ndarray,
    spec: ClipSpec,
    rng: np.random.Generator | None,
    clip_id: str,
) -> np.ndarray:
  """Take `spec.num_frames` frames `spec.frame_stride` apart from a video.

  Args:
    video: array (T, H, W, C).
    spec: clip settings.
    rng: picks a uniformly random start when given, or None for the centred clip.
    clip_id: name of the video, used in the error message.

  Returns:
    Array (num_frames, H, W, C), a view into `video` unless padding was needed.

  Raises:
    ValueError: the video has fewer than `spec.span` frames and `spec.pad_short_clips` is off.
  """
  available = video.shape[0]
  if available < spec.span:
    if not spec.pad_short_clips:
      raise ValueError(
          f"Video {clip_id!r} is too short: num_frames={spec.num_frames} at "
          f"frame_stride={spec.frame_stride} needs {spec.span} frames, but only {available} "
          "are available. Set data.pad_short_clips=True to repeat the last frame, or lower "
          "data.num_frames or data.frame_stride."
      )
    padding = np.repeat(video[-1:], spec.span - available, axis=0)
    video = np.concatenate([video, padding], axis=0)

  max_start = video.shape[0] - spec.span
  if rng is None:
    start = max_start // 2
  else:
    start = int(rng.integers(0, max_start + 1))
  return video[start : start + spec.span : spec.frame_stride]


def resize_to_cover(video: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resize frames, keeping their aspect ratio, to the smallest size covering (height, width).

  Args:
    video: uint8 array (T, H, W, 3) of any size, odd sizes included.
    height: minimum output height.
    width: minimum output width.

  Returns:
    uint8 array (T, H', W', 3) with H' >= height, W' >= width and one side equal. The input is
    returned unchanged when it already has that size.
  """
  new_height, new_width = video_io.cover_shape(video.shape[1], video.shape[2], height, width)
  if (new_height, new_width) == video.shape[1:3]:
    return video

  # Pillow's bilinear filter widens its support when shrinking, so downscaling is antialiased.
  resized = [
      np.asarray(
          Image.fromarray(frame).resize((new_width, new_height), Image.Resampling.BILINEAR)
      )
      for frame in video
  ]
  return np.stack(resized)


def crop(
    video: np.ndarray, height: int, width: int, rng: np.random.Generator | None
) -> np.ndarray:
  """Crop every frame to (height, width) at one random position (rng) or at the centre (None)."""
  max_top = video.shape[1] - height
  max_left = video.shape[2] - width
  if max_top < 0 or max_left < 0:
    raise ValueError(
        f"Cannot crop {height}x{width} from frames of {video.shape[1]}x{video.shape[2]}. "
        "Resize with resize_to_cover first."
    )

  if rng is None:
    top, left = max_top // 2, max_left // 2
  else:
    top = int(rng.integers(0, max_top + 1))
    left = int(rng.integers(0, max_left + 1))
  return video[:, top : top + height, left : left + width]


def to_rgb(video: np.ndarray, clip_id: str) -> np.ndarray:
  """Convert a uint8 (T, H, W), (T, H, W, 1), (T, H, W, 3) or (T, H, W, 4) video to RGB."""
  if video.dtype != np.uint8:
    raise ValueError(f"Video {clip_id!r} has dtype {video.dtype}, but uint8 pixels are expected.")
  if video.ndim == 3:
    video = video[..., None]
  if video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"Video {clip_id!r} has shape {video.shape}. Expected (T, H, W) or (T, H, W, C) "
        "with C in {1, 3, 4}."
    )

  if video.shape[-1] == 1:
    return np.repeat(video, 3, axis=-1)
  # NOTE: alpha is dropped without compositing onto a background.
  return video[..., :3]


def to_model_range(video: np.ndarray) -> np.ndarray:
  """Map uint8 pixels to float32 in [-1, 1]."""
  return video.astype(np.float32) / 127.5 - 1.0


def process_clip(
    video: np.ndarray,
    spec: ClipSpec,
    rng: np.random.Generator | None,
    clip_id: str,
) -> np.ndarray:
  """Turn a decoded video into one model input clip.

  Steps: sample frames, convert to RGB, resize to cover the target size, crop (random when
  `rng` is given and `spec.random_crop` is on, else centred), flip (only with `rng` and
  `spec.random_flip`), then scale to [-1, 1].

  Args:
    video: uint8 array (T, H, W, C) or (T, H, W) of any frame size.
    spec: clip settings.
    rng: random generator for training, or None for the deterministic evaluation clip.
    clip_id: name of the video, used in error messages.

  Returns:
    float32 array (spec.num_frames, spec.height, spec.width, 3) in [-1, 1].
  """
  clip = sample_clip(np.asarray(video), spec, rng, clip_id)
  clip = to_rgb(clip, clip_id)
  clip = resize_to_cover(clip, spec.height, spec.width)

  crop_rng = rng if spec.random_crop else None
  clip = crop(clip, spec.height, spec.width, crop_rng)

  if rng is not None and spec.random_flip and rng.random() < 0.5:
    clip = clip[:, :, ::-1]
  return to_model_range(clip)
