"""Config sections shared by every model: data, mesh, optimizer, training loop and checkpoints.

Model configs import these and override fields per variant. Every config is locked after it is
built, so a mistyped `--config.x=y` override fails instead of being ignored.
"""

import ml_collections

ATARI_GAMES = ("Pong", "Breakout", "SpaceInvaders", "MsPacman", "Seaquest", "Enduro", "Freeway",
               "Boxing")


def data_config() -> ml_collections.ConfigDict:
  """Data pipeline fields; see tokdiff/data/pipeline.py for what each source reads."""
  data = ml_collections.ConfigDict()
  data.source = "atari"  # atari | sample_videos | video_folder | tfds | token_cache
  data.eval_sources = ("atari", "sample_videos")
  data.num_frames = 17  # must be 1 + 4k for the default tokenizer
  data.frame_stride = 1
  data.height = 128
  data.width = 128
  data.random_crop = True
  data.random_flip = False
  data.pad_short_clips = False
  data.on_bad_video = "skip"  # skip | raise
  data.shuffle_seed = 0
  data.worker_count = 0
  data.cache_dir = ""

  data.atari = ml_collections.ConfigDict()
  data.atari.games = ATARI_GAMES
  data.atari.num_train_clips = 2048
  data.atari.num_eval_clips = 64
  data.atari.train_seed = 0
  data.atari.eval_seed = 1_000_000
  data.atari.max_warmup_steps = 400
  data.atari.frame_skip = 2

  data.video_folder = ml_collections.ConfigDict()
  data.video_folder.path = ""
  data.video_folder.eval_path = ""

  data.tfds = ml_collections.ConfigDict()
  data.tfds.name = ""
  data.tfds.data_dir = ""
  data.tfds.train_split = "train"
  data.tfds.eval_split = "test"
  data.tfds.video_key = "video"
  data.tfds.label_key = "label"

  # Folder written by `python -m launch.tokenize`, read when data.source is 'token_cache'.
  data.token_cache = ml_collections.ConfigDict()
  data.token_cache.path = ""
  return data


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh sizes (-1 fills the remaining devices) and logical-to-mesh axis rules."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  # (logical axis name, mesh axis or axes). Names not listed stay replicated.
  mesh.axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("conv_in", "fsdp"),
      ("conv_out", "tensor"),
  )
  return mesh


def optimizer_config() -> ml_collections.ConfigDict:
  """AdamW with linear warm-up, cosine decay, global-norm clipping and a parameter EMA."""
  opt = ml_collections.ConfigDict()
  opt.learning_rate = 1e-4
  opt.warmup_steps = 1000
  opt.end_learning_rate_factor = 0.1
  opt.b1 = 0.9
  opt.b2 = 0.99
  opt.weight_decay = 1e-4
  opt.grad_clip_norm = 1.0
  opt.ema_decay = 0.999
  return opt


def train_config() -> ml_collections.ConfigDict:
  """Loop lengths and intervals, all in steps."""
  train = ml_collections.ConfigDict()
  train.num_steps = 100_000
  train.batch_size = 64  # global, over all processes
  train.log_every = 50
  train.eval_every = 5000
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.async_checkpoints = True
  train.progress_bar = True
  # Stop with a checkpoint after this many steps in one process (0 = no limit), for jobs that
  # run under a wall-clock limit and resume in the next allocation.
  train.max_steps_per_run = 0
  return train


def eval_config() -> ml_collections.ConfigDict:
  ev = ml_collections.ConfigDict()
  ev.batch_size = 16
  ev.max_batches = 4
  ev.num_visualized = 8  # clips per reconstruction grid
  ev.gif_fps = 8
  return ev


def shrink_loop_to_cpu(config: ml_collections.ConfigDict, num_steps: int) -> None:
  """Set the optimizer, loop and eval sizes every model's CPU-sized `tiny` variant shares."""
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.ema_decay = 0.99

  config.train.num_steps = num_steps
  config.train.batch_size = 8
  config.train.log_every = 25
  config.train.eval_every = num_steps // 2
  config.train.checkpoint_every = 100

  config.eval.batch_size = 8
  config.eval.max_batches = 2


def shrink_loop_to_smoke(config: ml_collections.ConfigDict) -> None:
  """Set a 4-step loop that checkpoints twice, for tests of every model."""
  config.optimizer.warmup_steps = 1
  config.train.num_steps = 4
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.checkpoint_every = 2
  config.train.progress_bar = False
  config.eval.max_batches = 1
