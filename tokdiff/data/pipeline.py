"""Training loader and evaluation batches built from the `data` config section (grain 0.2).

The `data` ConfigDict has these fields:
  source, eval_sources, num_frames, frame_stride, height, width, random_crop, random_flip,
  pad_short_clips, on_bad_video, shuffle_seed, worker_count, cache_dir,
  atari.{games, num_train_clips, num_eval_clips, train_seed, eval_seed, max_warmup_steps,
         frame_skip},
  video_folder.{path, eval_path},
  tfds.{name, data_dir, train_split, eval_split, video_key, label_key},
  token_cache.{path}.

Batches are dicts of numpy arrays: `video` float32 (B, T, H, W, 3) in [-1, 1] and `label`
int32 (B,). Evaluation batches also contain `clip_id` (B,) strings and a boolean `mask` (B,).
The 'token_cache' source (a folder written by `python -m launch.tokenize`) yields `tokens` int32
(B, t, h, w) and `latents` float32 (B, t, h, w, K) in place of `video`.
"""

from __future__ import annotations

import json

import grain.python as grain
import numpy as np

from tokdiff.data import atari
from tokdiff.data import sources
from tokdiff.data import token_cache
from tokdiff.data import transforms

SOURCE_NAMES = ("atari", "sample_videos", "video_folder", "tfds")
TOKEN_CACHE = "token_cache"
SPLITS = ("train", "eval")


def clip_spec(data, *, train: bool) -> transforms.ClipSpec:
  """Build the clip settings of one split. Evaluation always uses centre crops and no flip."""
  return transforms.ClipSpec(
      num_frames=data.num_frames,
      frame_stride=data.frame_stride,
      height=data.height,
      width=data.width,
      random_crop=train and data.random_crop,
      random_flip=train and data.random_flip,
      pad_short_clips=data.pad_short_clips,
  )


def atari_settings(data, split: str) -> atari.AtariClipSettings:
  """Build the Atari settings of one split, after checking that train and eval seeds differ."""
  config = data.atari
  common = dict(
      games=tuple(config.games),
      clip_length=clip_spec(data, train=False).span,
      frame_skip=config.frame_skip,
      max_warmup_steps=config.max_warmup_steps,
      cover_size=(data.height, data.width),
  )
  train = atari.AtariClipSettings(
      num_clips=config.num_train_clips, seed=config.train_seed, **common
  )
  evaluation = atari.AtariClipSettings(
      num_clips=config.num_eval_clips, seed=config.eval_seed, **common
  )
  atari.check_disjoint_seeds(train, evaluation)
  return train if split == "train" else evaluation


def make_source(data, split: str, source_name: str | None = None):
  """Build a random-access source of raw video records.

  Args:
    data: the `data` config section.
    split: 'train' or 'eval'.
    source_name: one of SOURCE_NAMES, by default `data.source`.

  Returns:
    An object with `__len__` and `__getitem__` returning dicts with `video` (uint8
    (T, H, W, 3), or None for an unreadable file), `label` (int) and `clip_id` (str).
  """
  name = source_name or data.source
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  cover_size = (data.height, data.width)

  if name == "atari":
    return atari.AtariSource(atari_settings(data, split), cache_dir=data.cache_dir or None)

  if name == "sample_videos":
    return sources.SampleVideoSource(split, cover_size=cover_size)

  if name == "video_folder":
    train_root = data.video_folder.path
    if not train_root:
      raise ValueError("data.video_folder.path is empty. Set it to a folder of video files.")
    root = train_root if split == "train" else (data.video_folder.eval_path or train_root)
    return sources.VideoFolderSource(
        root,
        cover_size=cover_size,
        on_bad_video=data.on_bad_video,
        # Label ids come from the training folder so that both splits agree.
        class_names=sources.folder_class_names(train_root),
    )

  if name == "tfds":
    config = data.tfds
    return sources.TfdsSource(
        config.name,
        config.train_split if split == "train" else config.eval_split,
        data_dir=config.data_dir or None,
        video_key=config.video_key,
        label_key=config.label_key or None,
    )

  raise ValueError(f"Unknown data source {name!r}. Expected one of {SOURCE_NAMES}.")


class DropUnreadable(grain.FilterTransform):
  """Drop records whose file could not be decoded (the source logged and counted them)."""

  def filter(self, element: dict) -> bool:
    return element["video"] is not None


class TrainClip(grain.RandomMapTransform):
  """Cut, augment and normalise one training clip with grain's per-record random generator.

  grain derives the generator from the sampler seed and the record's position in the stream,
  so a restored iterator repeats the same crops and flips.
  """

  def __init__(self, spec: transforms.ClipSpec):
    self.spec = spec

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    video = transforms.process_clip(element["video"], self.spec, rng, element["clip_id"])
    return {"video": video, "label": np.int32(element["label"])}


def combine_seeds(*seeds: int) -> int:
  """Mix several integer seeds into one 32-bit seed."""
  return int(np.random.SeedSequence([int(seed) for seed in seeds]).generate_state(1)[0])


def make_train_loader(
    data, *, global_batch_size: int, seed: int, process_index: int, process_count: int
) -> grain.DataLoader:
  """Build the infinite, shuffled training loader of one process.

  Args:
    data: the `data` config section.
    global_batch_size: batch size summed over all processes.
    seed: run seed, mixed with `data.shuffle_seed` into the shuffle and augmentation seed.
    process_index: index of this process, which reads shard `process_index` of the records.
    process_count: number of processes (shards).

  Returns:
    A grain.DataLoader. Its iterator yields `video` float32 (B, T, H, W, 3) in [-1, 1] and
    `label` int32 (B,) with B = global_batch_size // process_count, and supports
    `get_state()` / `set_state(state)` (see `loader_state_to_json`). With data.source
    'token_cache' it yields `tokens`, `latents` and `label` from the cache's train split.
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by process_count="
        f"{process_count}. Choose a multiple of the process count."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} is out of range. Expected 0 <= process_index < "
        f"process_count={process_count}."
    )
  batch_size = global_batch_size // process_count

  if data.source == TOKEN_CACHE:
    source = token_cache.TokenCacheSource(data.token_cache.path, "train")
    operations = [token_cache.TrainElement()]
  else:
    source = make_source(data, "train")
    operations = [DropUnreadable(), TrainClip(clip_spec(data, train=True))]
  if len(source) < process_count:
    raise ValueError(
        f"The training source has {len(source)} records, fewer than the {process_count} "
        "processes that each need a shard. Add data or use fewer processes."
    )

  sampler = grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.ShardOptions(
          shard_index=process_index, shard_count=process_count, drop_remainder=True
      ),
      shuffle=True,
      num_epochs=None,
      seed=combine_seeds(data.shuffle_seed, seed),
  )
  operations.append(grain.Batch(batch_size, drop_remainder=True))
  # Raw records can be whole decoded videos, so prefetch a few batches rather than grain's
  # default of 500 records.
  read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(2 * batch_size, 8))
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=operations,
      worker_count=data.worker_count,
      read_options=read_options,
  )


def loader_state_to_json(state: bytes) -> dict:
  """Convert a grain iterator state (JSON text as bytes) into a dict for a JSON checkpoint."""
  return json.loads(state.decode("utf-8"))


def loader_state_from_json(state: dict) -> bytes:
  """Convert a dict from `loader_state_to_json` back into the bytes `set_state` expects."""
  return json.dumps(state, indent=4).encode("utf-8")


def _pad_eval_batch(clips: list[tuple[np.ndarray, int, str]], batch_size: int) -> dict:
  """Stack clips into one batch, repeating them to fill it. `mask` marks the real clips."""
  num_real = len(clips)
  padded = [clips[index % num_real] for index in range(batch_size)]
  return {
      "video": np.stack([clip for clip, _, _ in padded]),
      "label": np.asarray([label for _, label, _ in padded], dtype=np.int32),
      "clip_id": np.asarray([clip_id for _, _, clip_id in padded]),
      "mask": np.arange(batch_size) < num_real,
  }


def eval_batches(
    data, *, source_name: str, batch_size: int, max_batches: int | None
) -> list[dict]:
  """Build deterministic evaluation batches from the held-out split of one source.

  Clips are taken in source order with the centred clip, a centre crop and no flip. Unreadable
  files are skipped (or raise, with `data.on_bad_video='raise'`).

  Args:
    data: the `data` config section.
    source_name: one of SOURCE_NAMES or 'token_cache', usually an entry of `data.eval_sources`.
    batch_size: clips per batch.
    max_batches: stop after this many batches, or None to use the whole split.

  Returns:
    A list of dicts with `video` float32 (batch_size, T, H, W, 3), `label` int32, `clip_id`
    str and `mask` bool, each of shape (batch_size,) after `video`. The last batch is padded by
    repeating its clips, and `mask` is False on the padding. For 'token_cache', `tokens` and
    `latents` replace `video` (see `token_cache.eval_batches`).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  if source_name == TOKEN_CACHE:
    return token_cache.eval_batches(data.token_cache.path, batch_size=batch_size,
                                    max_batches=max_batches)
  source = make_source(data, "eval", source_name)
  spec = clip_spec(data, train=False)
  max_clips = None if max_batches is None else batch_size * max_batches

  clips = []
  for index in range(len(source)):
    if max_clips is not None and len(clips) >= max_clips:
      break
    record = source[index]
    if record["video"] is None:
      continue
    video = transforms.process_clip(record["video"], spec, None, record["clip_id"])
    clips.append((video, int(record["label"]), record["clip_id"]))

  if not clips:
    raise ValueError(f"The eval split of source {source_name!r} has no readable clips.")
  return [
      _pad_eval_batch(clips[start : start + batch_size], batch_size)
      for start in range(0, len(clips), batch_size)
  ]
