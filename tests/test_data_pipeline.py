"""Tests for the data sources, clip transforms and the grain pipeline in tokdiff.data."""

import importlib.util
import json
import logging
import shutil

import chex
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tokdiff import video_io
from tokdiff.data import atari
from tokdiff.data import pipeline
from tokdiff.data import sources
from tokdiff.data import transforms

NUM_FRAMES = 5
SIZE = 32


def make_data_config(cache_dir="", **overrides):
  """Tiny `data` config: 8 Atari clips of 5 frames at 32x32 per split."""
  data = ml_collections.ConfigDict(
      {
          "source": "atari",
          "eval_sources": ("atari", "sample_videos"),
          "num_frames": NUM_FRAMES,
          "frame_stride": 1,
          "height": SIZE,
          "width": SIZE,
          "random_crop": True,
          "random_flip": True,
          "pad_short_clips": False,
          "on_bad_video": "skip",
          "shuffle_seed": 7,
          "worker_count": 0,
          "cache_dir": str(cache_dir),
          "atari": {
              "games": atari.DEFAULT_GAMES,
              "num_train_clips": 8,
              "num_eval_clips": 8,
              "train_seed": 0,
              "eval_seed": 1000,
              "max_warmup_steps": 20,
              "frame_skip": 4,
          },
          "video_folder": {"path": "", "eval_path": ""},
          "tfds": {
              "name": "",
              "data_dir": "",
              "train_split": "train",
              "eval_split": "test",
              "video_key": "video",
              "label_key": "label",
          },
      }
  )
  data.update_from_flattened_dict(overrides)
  return data


@pytest.fixture(scope="module")
def atari_cache(tmp_path_factory):
  """Cache folder shared by the loader tests, so each split is rendered once per module."""
  return tmp_path_factory.mktemp("atari_cache")


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Atari source


def test_atari_clips_deterministic_across_builds(atari_cache):
  data = make_data_config(atari_cache)

  # The first build may come from the cache that an earlier build in this module wrote.
  first = pipeline.make_source(data, "train")
  second = atari.AtariSource(pipeline.atari_settings(data, "train"))

  assert len(first) == len(second) == 8
  for index in range(len(first)):
    assert first[index]["video"].tobytes() == second[index]["video"].tobytes()
    assert first[index]["clip_id"] == second[index]["clip_id"]


def test_atari_worker_processes_give_same_clips():
  overrides = {"atari.num_train_clips": 4, "atari.games": ("Pong", "Seaquest")}
  settings = pipeline.atari_settings(make_data_config(**overrides), "train")

  serial_videos, serial_labels = atari.render_clips(settings, num_workers=1)
  parallel_videos, parallel_labels = atari.render_clips(settings, num_workers=2)

  np.testing.assert_array_equal(serial_videos, parallel_videos)
  np.testing.assert_array_equal(serial_labels, parallel_labels)
  assert serial_labels.tolist() == [0, 1, 0, 1]


def test_atari_eight_games_render(atari_cache):
  source = pipeline.make_source(make_data_config(atari_cache), "eval")

  assert len(atari.DEFAULT_GAMES) >= 8
  assert [source[i]["label"] for i in range(8)] == list(range(8))
  for index in range(8):
    video = source[index]["video"]
    # 210x160 frames scaled to cover 32x32.
    chex.assert_shape(video, (NUM_FRAMES, 42, 32, 3))
    assert video.dtype == np.uint8
    assert video.std() > 1.0, f"{source[index]['clip_id']} renders a blank screen"
    assert not np.array_equal(video[0], video[-1]), f"{source[index]['clip_id']} is static"
    assert atari.DEFAULT_GAMES[index] in source[index]["clip_id"]


def test_atari_train_and_eval_clips_differ(atari_cache):
  data = make_data_config(atari_cache)

  train = pipeline.make_source(data, "train")
  evaluation = pipeline.make_source(data, "eval")

  train_clips = {train[i]["video"].tobytes() for i in range(len(train))}
  eval_clips = {evaluation[i]["video"].tobytes() for i in range(len(evaluation))}
  assert len(train_clips) == 8
  assert not train_clips & eval_clips


def test_atari_overlapping_seeds_rejected():
  data = make_data_config(**{"atari.eval_seed": 4})

  with pytest.raises(ValueError, match="overlap"):
    pipeline.make_source(data, "eval")


def test_atari_cache_reuses_clips(tmp_path):
  overrides = {"atari.num_train_clips": 2, "atari.games": ("Pong",)}
  settings = pipeline.atari_settings(make_data_config(**overrides), "train")

  rendered = atari.AtariSource(settings, cache_dir=tmp_path)
  cache_files = list(tmp_path.glob("atari-*.npz"))
  cached = atari.AtariSource(settings, cache_dir=tmp_path)

  assert len(cache_files) == 1
  np.testing.assert_array_equal(rendered[1]["video"], cached[1]["video"])
  other = pipeline.atari_settings(make_data_config(**overrides, **{"atari.frame_skip": 3}), "train")
  assert other.cache_key() != settings.cache_key()


# ---------------------------------------------------------------------------------------------
# Transforms


def test_short_clip_error_names_clip_and_lengths():
  spec = transforms.ClipSpec(num_frames=5, frame_stride=2, height=8, width=8)
  video = np.zeros((4, 10, 10, 3), np.uint8)

  with pytest.raises(ValueError) as raised:
    transforms.process_clip(video, spec, None, "folder/short.mp4")

  message = str(raised.value)
  assert "folder/short.mp4" in message
  assert "needs 9 frames" in message
  assert "only 4" in message
  assert "pad_short_clips" in message


def test_short_clip_padding_repeats_last_frame():
  spec = transforms.ClipSpec(num_frames=5, frame_stride=1, height=8, width=8, pad_short_clips=True)
  video = np.stack([np.full((8, 8, 3), 50 * index, np.uint8) for index in range(3)])

  clip = transforms.process_clip(video, spec, None, "short")

  chex.assert_shape(clip, (5, 8, 8, 3))
  expected_levels = np.array([0, 50, 100, 100, 100]) / 127.5 - 1.0
  np.testing.assert_allclose(clip[:, 0, 0, 0], expected_levels, atol=1e-6)


def test_odd_size_grayscale_clip_is_resized_to_rgb():
  spec = transforms.ClipSpec(num_frames=3, frame_stride=2, height=SIZE, width=SIZE)
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (7, 37, 51), dtype=np.uint8)

  clip = transforms.process_clip(video, spec, None, "gray")

  chex.assert_shape(clip, (3, SIZE, SIZE, 3))
  chex.assert_type(clip, np.float32)
  assert clip.min() >= -1.0
  assert clip.max() <= 1.0
  np.testing.assert_array_equal(clip[..., 0], clip[..., 1])


def test_random_crop_and_flip_follow_rng():
  spec = transforms.ClipSpec(
      num_frames=2, frame_stride=1, height=8, width=8, random_crop=True, random_flip=True
  )
  video = np.random.default_rng(1).integers(0, 256, (6, 8, 20, 3), dtype=np.uint8)

  clips = [
      transforms.process_clip(video, spec, np.random.default_rng(seed), "v") for seed in range(8)
  ]
  repeated = transforms.process_clip(video, spec, np.random.default_rng(3), "v")
  centre = transforms.process_clip(video, spec, None, "v")

  np.testing.assert_array_equal(clips[3], repeated)
  assert len({clip.tobytes() for clip in clips}) > 1
  np.testing.assert_array_equal(centre, transforms.to_model_range(video[2:4, :, 6:14]))


# ---------------------------------------------------------------------------------------------
# Training loader


def test_train_loader_batch_format(atari_cache):
  data = make_data_config(atari_cache)
  loader = pipeline.make_train_loader(
      data, global_batch_size=8, seed=0, process_index=0, process_count=2
  )

  batch = next(iter(loader))

  assert set(batch) == {"video", "label"}
  chex.assert_shape(batch["video"], (4, NUM_FRAMES, SIZE, SIZE, 3))
  chex.assert_type(batch["video"], np.float32)
  chex.assert_shape(batch["label"], (4,))
  assert batch["label"].dtype == np.int32
  assert batch["video"].min() >= -1.0
  assert batch["video"].max() <= 1.0
  assert batch["video"].max() - batch["video"].min() > 0.5
  assert set(batch["label"].tolist()) <= set(range(8))


def test_train_loader_is_deterministic(atari_cache):
  data = make_data_config(atari_cache)
  kwargs = dict(global_batch_size=2, process_index=0, process_count=1)

  first = take(iter(pipeline.make_train_loader(data, seed=1, **kwargs)), 5)
  second = take(iter(pipeline.make_train_loader(data, seed=1, **kwargs)), 5)
  other_seed = take(iter(pipeline.make_train_loader(data, seed=2, **kwargs)), 5)

  assert_batches_equal(first, second)
  assert any(
      not np.array_equal(a["video"], b["video"]) for a, b in zip(first, other_seed)
  )


def test_train_loader_resumes_from_json_state(atari_cache):
  data = make_data_config(atari_cache)
  kwargs = dict(global_batch_size=3, seed=0, process_index=0, process_count=1)
  iterator = iter(pipeline.make_train_loader(data, **kwargs))
  take(iterator, 3)

  saved = pipeline.loader_state_to_json(iterator.get_state())
  expected = take(iterator, 2)

  # The state survives a JSON file round trip, as in a checkpoint.
  restored_state = pipeline.loader_state_from_json(json.loads(json.dumps(saved)))
  resumed = iter(pipeline.make_train_loader(data, **kwargs))
  resumed.set_state(restored_state)
  assert_batches_equal(take(resumed, 2), expected)


def test_train_loader_shards_are_disjoint(atari_cache):
  # Without crop and flip, every record maps to one fixed clip, which identifies it.
  data = make_data_config(atari_cache, random_crop=False, random_flip=False)
  spec = pipeline.clip_spec(data, train=False)
  source = pipeline.make_source(data, "train")
  index_of_clip = {
      transforms.process_clip(source[i]["video"], spec, None, "").tobytes(): i
      for i in range(len(source))
  }

  seen = []
  for process_index in range(2):
    loader = pipeline.make_train_loader(
        data, global_batch_size=4, seed=0, process_index=process_index, process_count=2
    )
    # 8 records, 4 per shard, 2 per process batch: two batches are one epoch of the shard.
    videos = np.concatenate([batch["video"] for batch in take(iter(loader), 2)])
    seen.append({index_of_clip[video.tobytes()] for video in videos})

  assert len(seen[0]) == 4
  assert len(seen[1]) == 4
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(8))


def test_train_loader_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_loader(
        make_data_config(), global_batch_size=5, seed=0, process_index=0, process_count=2
    )


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_pad_last_batch(atari_cache):
  data = make_data_config(atari_cache)

  batches = pipeline.eval_batches(data, source_name="atari", batch_size=3, max_batches=None)
  again = pipeline.eval_batches(data, source_name="atari", batch_size=3, max_batches=None)

  assert_batches_equal(batches, again)
  assert len(batches) == 3
  for batch in batches:
    chex.assert_shape(batch["video"], (3, NUM_FRAMES, SIZE, SIZE, 3))
    chex.assert_shape([batch["label"], batch["clip_id"], batch["mask"]], [(3,)] * 3)
  assert batches[-1]["mask"].tolist() == [True, True, False]
  real_ids = np.concatenate([batch["clip_id"][batch["mask"]] for batch in batches])
  assert len(set(real_ids.tolist())) == 8


def test_eval_batches_max_batches(atari_cache):
  data = make_data_config(atari_cache)

  batches = pipeline.eval_batches(data, source_name="atari", batch_size=2, max_batches=2)

  assert len(batches) == 2
  assert all(batch["mask"].all() for batch in batches)


def test_sample_videos_hold_out_last_frames():
  data = make_data_config(num_frames=9)

  train = pipeline.make_source(data, "train", "sample_videos")
  evaluation = pipeline.make_source(data, "eval", "sample_videos")
  batches = pipeline.eval_batches(data, source_name="sample_videos", batch_size=4, max_batches=1)

  assert len(train) == len(evaluation) == 4
  assert [train[i]["label"] for i in range(4)] == [0, 1, 2, 3]
  carphone = [i for i in range(4) if "carphone_pristine" in train[i]["clip_id"]][0]
  full = video_io.read_video(train.paths[carphone], cover_size=(SIZE, SIZE))
  # carphone_pristine.mp4 has 120 frames, and the last quarter is held out for evaluation.
  assert len(full) == 120
  np.testing.assert_array_equal(train[carphone]["video"], full[:90])
  np.testing.assert_array_equal(evaluation[carphone]["video"], full[90:])
  assert min(train[i]["video"].shape[1] for i in range(4)) == SIZE
  chex.assert_shape(batches[0]["video"], (4, 9, SIZE, SIZE, 3))


# ---------------------------------------------------------------------------------------------
# Video folder


def _write_video_folder(root):
  rng = np.random.default_rng(0)

  def frames(num_frames, height, width):
    return rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)

  (root / "cats" / "indoor").mkdir(parents=True)
  (root / "dogs").mkdir()
  video_io.write_mp4(root / "cats" / "a.mp4", frames(6, 40, 48))
  video_io.write_gif(root / "cats" / "indoor" / "b.gif", frames(6, 27, 41))
  video_io.write_mp4(root / "dogs" / "c.mp4", frames(7, 36, 36))
  (root / "dogs" / "broken.mp4").write_bytes(rng.bytes(3000))
  (root / "dogs" / "empty.mkv").touch()
  (root / "dogs" / "notes.txt").write_text("not a video")


def test_video_folder_labels_and_skipped_files(tmp_path, caplog):
  _write_video_folder(tmp_path)
  data = make_data_config(source="video_folder", **{"video_folder.path": str(tmp_path)})

  with caplog.at_level(logging.WARNING):
    source = pipeline.make_source(data, "train")

  labels = {source[i]["clip_id"]: source[i]["label"] for i in range(len(source))}
  assert labels == {"cats/a.mp4": 0, "cats/indoor/b.gif": 0, "dogs/c.mp4": 1}
  assert source.class_names == ("cats", "dogs")
  warnings = [record.getMessage() for record in caplog.records]
  assert any("broken.mp4" in text and "1 unreadable" in text for text in warnings)
  assert any("empty.mkv" in text and "2 unreadable" in text for text in warnings)
  assert source.bad_videos.skipped_files == [
      str(tmp_path / "dogs" / "broken.mp4"),
      str(tmp_path / "dogs" / "empty.mkv"),
  ]


def test_video_folder_raise_policy(tmp_path):
  _write_video_folder(tmp_path)
  data = make_data_config(
      source="video_folder", on_bad_video="raise", **{"video_folder.path": str(tmp_path)}
  )

  with pytest.raises(video_io.VideoReadError, match="broken.mp4"):
    pipeline.make_source(data, "train")


def test_video_folder_loader_and_eval(tmp_path):
  _write_video_folder(tmp_path)
  data = make_data_config(source="video_folder", **{"video_folder.path": str(tmp_path)})

  batch = next(iter(pipeline.make_train_loader(
      data, global_batch_size=2, seed=0, process_index=0, process_count=1
  )))
  batches = pipeline.eval_batches(data, source_name="video_folder", batch_size=2, max_batches=4)

  chex.assert_shape(batch["video"], (2, NUM_FRAMES, SIZE, SIZE, 3))
  assert len(batches) == 2
  assert batches[1]["mask"].tolist() == [True, False]
  assert sorted(np.concatenate([b["clip_id"][b["mask"]] for b in batches]).tolist()) == [
      "cats/a.mp4",
      "cats/indoor/b.gif",
      "dogs/c.mp4",
  ]


def test_video_folder_drops_file_failing_mid_stream(tmp_path, caplog):
  rng = np.random.default_rng(0)
  for name in ("a.gif", "b.gif", "c.gif"):
    video_io.write_gif(tmp_path / name, rng.integers(0, 256, (6, 30, 30, 3), dtype=np.uint8))
  # The first frame still decodes, so the file passes the probe and fails on full reads.
  data_bytes = (tmp_path / "b.gif").read_bytes()
  (tmp_path / "b.gif").write_bytes(data_bytes[: int(len(data_bytes) * 0.6)])
  data = make_data_config(source="video_folder", **{"video_folder.path": str(tmp_path)})

  with caplog.at_level(logging.WARNING):
    loader = pipeline.make_train_loader(
        data, global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    batches = take(iter(loader), 3)
    eval_ids = np.concatenate(
        [b["clip_id"][b["mask"]] for b in pipeline.eval_batches(
            data, source_name="video_folder", batch_size=2, max_batches=None
        )]
    )

  for batch in batches:
    chex.assert_shape(batch["video"], (2, NUM_FRAMES, SIZE, SIZE, 3))
  assert sorted(eval_ids.tolist()) == ["a.gif", "c.gif"]
  assert any("b.gif" in record.getMessage() for record in caplog.records)


def test_video_folder_root_files_get_label_zero(tmp_path):
  frames = np.zeros((5, 16, 16, 3), np.uint8)
  (tmp_path / "zebra").mkdir()
  video_io.write_gif(tmp_path / "loose.gif", frames)
  video_io.write_gif(tmp_path / "zebra" / "z.gif", frames)

  source = sources.VideoFolderSource(tmp_path)

  labels = {source[i]["clip_id"]: source[i]["label"] for i in range(len(source))}
  assert labels == {"loose.gif": 0, "zebra/z.gif": 1}


# ---------------------------------------------------------------------------------------------
# TFDS


def _tiny_tfds_builder_class():
  """Builder with Sequence(Image), Tensor (RGB and grayscale) and Image video features."""

  class TinyVideoClips(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {
                  "frames": tfds.features.Sequence(tfds.features.Image(shape=(12, 10, 3))),
                  "clip": tfds.features.Tensor(shape=(6, 12, 10, 3), dtype=np.uint8),
                  "gray": tfds.features.Tensor(shape=(6, 12, 10, 1), dtype=np.uint8),
                  "image": tfds.features.Image(shape=(12, 10, 3)),
                  "label": tfds.features.ClassLabel(num_classes=3),
              }
          ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 4), "test": self._generate_examples(4, 6)}

    def _generate_examples(self, start, stop):
      for index in range(start, stop):
        example = tiny_tfds_example(index)
        # Sequence(Image) and Image encode PIL images without TensorFlow (numpy needs it).
        example["frames"] = [Image.fromarray(frame) for frame in example["frames"]]
        example["image"] = Image.fromarray(example["image"])
        yield index, example

  return TinyVideoClips


def tiny_tfds_example(index):
  rng = np.random.default_rng(index)
  return {
      "frames": rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8),
      "clip": rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8),
      "gray": rng.integers(0, 256, (6, 12, 10, 1), dtype=np.uint8),
      "image": rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
      "label": index % 3,
  }


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  # Unregistered, so tfds.data_source reads the prepared files as it would in a new process.
  with tfds.core.registered.skip_registration():
    builder_class = _tiny_tfds_builder_class()
  builder = builder_class(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return data_dir


@pytest.mark.parametrize("video_key", ["frames", "clip", "gray", "image"])
def test_tfds_source_reads_features(tfds_dir, video_key):
  data = make_data_config(
      source="tfds",
      **{"tfds.name": "tiny_video_clips", "tfds.data_dir": str(tfds_dir), "tfds.video_key": video_key},
  )

  source = pipeline.make_source(data, "eval")
  record = source[1]

  assert len(source) == 2
  expected = tiny_tfds_example(5)[video_key]
  if video_key == "image":
    expected = expected[None]
  if expected.shape[-1] == 1:
    expected = np.repeat(expected, 3, axis=-1)
  np.testing.assert_array_equal(record["video"], expected)
  assert record["label"] == 5 % 3
  assert record["clip_id"] == "tiny_video_clips/test/1"


def test_tfds_loader_batches(tfds_dir):
  data = make_data_config(
      source="tfds", **{"tfds.name": "tiny_video_clips", "tfds.data_dir": str(tfds_dir)}
  )
  data.tfds.video_key = "clip"

  batch = next(iter(pipeline.make_train_loader(
      data, global_batch_size=4, seed=0, process_index=0, process_count=1
  )))

  chex.assert_shape(batch["video"], (4, NUM_FRAMES, SIZE, SIZE, 3))
  assert sorted(batch["label"].tolist()) == sorted(i % 3 for i in range(4))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="TensorFlow is installed, so Video features are readable.",
)
def test_tfds_video_feature_needs_tensorflow(tfds_dir, tmp_path):
  # Declare the 'clip' feature as tfds.features.Video in a copy of the prepared dataset.
  shutil.copytree(tfds_dir / "tiny_video_clips", tmp_path / "tiny_video_clips")
  features_path = next(tmp_path.glob("tiny_video_clips/*/features.json"))
  features = json.loads(features_path.read_text())
  features["featuresDict"]["features"]["clip"] = {
      "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
      "video": {"shape": {"dimensions": ["6", "12", "10", "3"]}, "dtype": "uint8"},
  }
  features_path.write_text(json.dumps(features))

  with pytest.raises(ImportError, match=r"pip install tokdiff\[tf\]"):
    sources.TfdsSource("tiny_video_clips", "train", data_dir=str(tmp_path), video_key="clip")
