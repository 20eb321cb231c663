"""MaskGIT and WALT as trainer tasks: losses, validation, sampling to video, end-to-end training."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import chex
from flax import nnx
import jax
import numpy as np
from PIL import Image
import pytest

from configs import magvit as magvit_configs
from configs import maskgit as maskgit_configs
from configs import walt as walt_configs
from magvit import lfq
from magvit import task as magvit_task
from maskgit import task as maskgit_task
from maskgit.model import count_params as maskgit_count_params
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import generation
from tokdiff import logger as logger_lib
from tokdiff import optim
from tokdiff import sharding as sharding_lib
from tokdiff import task as task_lib
from tokdiff import train_state
from tokdiff import trainer as trainer_lib
from tokdiff.sharding import ConfigError
from walt import task as walt_task
from walt.model import count_params as walt_count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ("maskgit", "walt")
CONFIG_MODULES = {"maskgit": maskgit_configs, "walt": walt_configs}
TASK_MODULES = {"maskgit": maskgit_task, "walt": walt_task}

# What the smoke tokenizer writes: 5 frames of 16x16 pixels -> a 2x2x2 grid of 6-bit tokens.
SMOKE_INFO = {"token_shape": [2, 2, 2], "latent_bits": 6, "num_classes": 3, "latent_kind": "lfq"}

# Compiling, not running, dominates at these sizes, so XLA's CPU optimisation is off where the
# tests compile their own functions.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _config(family, variant="smoke", **overrides):
  config = CONFIG_MODULES[family].get_config(variant)
  with config.unlocked():
    for name, value in overrides.items():
      node = config
      *parents, leaf = name.split(".")
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


def _task(family, info=None, tokenizer=None, **overrides):
  return TASK_MODULES[family].make_task(_config(family, **overrides),
                                        cache_info=dict(info or SMOKE_INFO), tokenizer=tokenizer)


def _batch(info, batch_size, seed=0):
  """A batch as the token cache yields it: token ids, their +-1 codes and labels."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 2 ** info["latent_bits"], (batch_size, *info["token_shape"]))
  tokens = tokens.astype(np.int32)
  return {
      "tokens": tokens,
      "latents": np.array(lfq.ids_to_bits(tokens, info["latent_bits"])),
      "label": rng.integers(0, info["num_classes"], (batch_size,)).astype(np.int32),
  }


def _init_jitted(build):
  """Build a module with jitted initialisation, which is many times faster than eager here."""
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.split(build())[1], compiler_options=_FAST_COMPILE)()
  return nnx.merge(graphdef, state)


# --- Loss under the jitted, sharded train step ---


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_on_sharded_mesh(family):
  config = _config(family, **{"optimizer.warmup_steps": 0})  # a non-zero first learning rate
  task = TASK_MODULES[family].make_task(config, cache_info=dict(SMOKE_INFO))
  task.validate()
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  factory = train_state.StateFactory(
      task.build_model, optim.make_optimizer(config.optimizer, config.train.num_steps), mesh,
      sharding_lib.rules_dict(config.mesh.axis_rules))
  batch = _batch(SMOKE_INFO, 8)
  step = trainer_lib.jit_train_step(
      trainer_lib.make_train_step(task, factory, config.optimizer.ema_decay), factory, batch)

  state = factory.init(config.seed)
  before = jax.device_get(state.params)
  state, metrics = step(state, sharding_lib.global_batch(batch, mesh))

  chex.assert_tree_all_finite(jax.device_get(metrics))
  assert int(state.step) == 1
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
  assert any(any(axis is not None for axis in spec) for spec in specs), "nothing was sharded"
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         jax.device_get(state.params))
  assert any(jax.tree.leaves(changed)), "one optimizer step left every parameter unchanged"


# --- Validation ---

BAD_SETTINGS = [
    ("maskgit", {"model.factor_groups": 4}, "model.factor_groups=4"),
    ("maskgit", {"sampling.num_steps": 9}, "sampling.num_steps=9"),
    ("maskgit", {"loss.mask_schedule": "square"}, "loss.mask_schedule='square'"),
    ("maskgit", {"sampling.mask_schedule": "square"}, "sampling.mask_schedule='square'"),
    ("maskgit", {"model.dropout": 1.0}, "model.dropout=1.0"),
    ("maskgit", {"loss.label_dropout": 1.5}, "loss.label_dropout=1.5"),
    ("maskgit", {"sampling.temperature": -1.0}, "sampling.temperature=-1.0"),
    ("walt", {"model.spatiotemporal_window": (0, 2, 2)}, "model.spatiotemporal_window"),
    ("walt", {"model.spatiotemporal_window": (2, 2)}, "model.spatiotemporal_window"),
    ("walt", {"model.spatial_window": (2,)}, "model.spatial_window"),
    ("walt", {"model.patch_size": 3}, "model.patch_size=3"),
    ("walt", {"loss.self_cond_prob": 1.5}, "loss.self_cond_prob=1.5"),
    ("walt", {"diffusion.schedule": "sqrt"}, "diffusion.schedule='sqrt'"),
    ("walt", {"sampling.num_steps": 0}, "sampling.num_steps=0"),
    ("maskgit", {"model.num_heads": 3}, "model.num_heads=3"),
    ("walt", {"model.num_heads": 3}, "model.num_heads=3"),
    ("walt", {"sampling.guidance_scale": -1.0}, "sampling.guidance_scale=-1.0"),
    ("maskgit", {"eval.num_samples": 0}, "eval.num_samples=0"),
    ("walt", {"data.source": "atari"}, "data.source='atari'"),
    ("maskgit", {"data.eval_sources": ("atari",)}, "data.eval_sources"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_accepts_smoke_config(family):
  _task(family).validate()


@pytest.mark.parametrize("family, overrides, message", BAD_SETTINGS,
                         ids=[f"{f}-{next(iter(o))}" for f, o, _ in BAD_SETTINGS])
def test_validate_rejects_bad_setting(family, overrides, message):
  task = _task(family, **overrides)
  with pytest.raises(ConfigError, match=re.escape(message)):
    task.validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_rejects_missing_cache(family, tmp_path):
  empty = TASK_MODULES[family].make_task(_config(family))
  with pytest.raises(ConfigError, match="data.token_cache.path is empty"):
    empty.validate()

  missing = TASK_MODULES[family].make_task(
      _config(family, **{"data.token_cache.path": str(tmp_path / "absent")}))
  with pytest.raises(ConfigError, match="does not exist"):
    missing.validate()


def test_walt_rejects_unknown_latent_kind():
  task = _task("walt", info=dict(SMOKE_INFO, latent_kind="pixels"))
  with pytest.raises(ConfigError, match="latent_kind='pixels'"):
    task.validate()


# --- Model sizes ---


def _tiny_tokenizer_info():
  """Cache info of the tiny tokenizer, derived from its config rather than written out."""
  config = magvit_configs.get_config("tiny")
  model = config.model
  temporal = 2 ** sum(bool(flag) for flag in model.temporal_downsample)
  spatial = 2 ** sum(bool(flag) for flag in model.spatial_downsample)
  grid = [1 + (config.data.num_frames - 1) // temporal, config.data.height // spatial,
          config.data.width // spatial]
  return {"token_shape": grid, "latent_bits": model.latent_bits,
          "num_classes": len(config.data.atari.games), "latent_kind": "lfq"}


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_parameter_counts_match(variant):
  info = _tiny_tokenizer_info()
  if variant == "base":
    info = dict(info, token_shape=[5, 16, 16], latent_bits=18)
  counts = {}
  for family, count_params in (("maskgit", maskgit_count_params), ("walt", walt_count_params)):
    task = TASK_MODULES[family].make_task(_config(family, variant), cache_info=info)
    task.validate()
    counts[family] = count_params(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
  print(f"{variant} on grid {info['token_shape']} with K={info['latent_bits']}: {counts}")
  assert abs(counts["walt"] / counts["maskgit"] - 1.0) <= 0.10, counts


# --- Sampling and evaluation with an untrained tokenizer ---


@pytest.fixture(scope="module")
def smoke_tokenizer():
  """An untrained smoke-sized tokenizer: real decoder, random weights, K = 6."""
  config = magvit_configs.get_config("smoke")
  assert config.model.latent_bits == SMOKE_INFO["latent_bits"]
  return _init_jitted(lambda: magvit_task.build_tokenizer(config.model, nnx.Rngs(0)))


@pytest.fixture(scope="module", params=FAMILIES)
def untrained(request, smoke_tokenizer):
  """(task, model) of one family with 3 samples per evaluation; shared so jit caches are reused."""
  task = _task(request.param, tokenizer=smoke_tokenizer, **{"eval.num_samples": 3})
  return task, _init_jitted(lambda: task.build_model(nnx.Rngs(0)))


def _eval_batch(info, num_real, batch_size, seed=0):
  """A host eval batch whose first `num_real` rows are real clips and the rest masked padding."""
  batch = _batch(info, batch_size, seed=seed)
  batch["mask"] = np.arange(batch_size) < num_real
  batch["clip_id"] = np.asarray([f"clip{seed}_{i}" for i in range(batch_size)])
  return batch


def _single_device_mesh():
  return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def test_evaluate_writes_sample_grid(untrained, tmp_path):
  task, model = untrained
  writer = logger_lib.MetricLogger(str(tmp_path), is_primary=True)
  context = task_lib.EvalContext(eval_batches={"token_cache": [_eval_batch(SMOKE_INFO, 4, 4)]},
                                 workdir=str(tmp_path), step=7, mesh=_single_device_mesh(),
                                 writer=writer)

  results = task.evaluate(model, context)
  writer.close()

  assert set(results) == {"token_cache/loss", "sampling_seconds_per_video",
                          "decode_seconds_per_video"}
  assert all(math.isfinite(value) and value >= 0 for value in results.values()), results
  gif = Image.open(tmp_path / "samples" / f"samples_{task.family}_0000007.gif")
  # Three 5x16x16 samples side by side in one row.
  assert gif.n_frames == 5
  assert gif.size == (3 * 16, 16)


def test_eval_loss_ignores_padding(untrained):
  task, model = untrained
  mesh = _single_device_mesh()
  first = _eval_batch(SMOKE_INFO, 2, 4, seed=0)
  other_padding = _eval_batch(SMOKE_INFO, 2, 4, seed=1)
  for name in task.batch_fields:
    other_padding[name][:2] = first[name][:2]

  loss = task.eval_loss(model, [first], mesh)
  np.testing.assert_allclose(task.eval_loss(model, [other_padding], mesh), loss, rtol=1e-6)

  # The loss reads the family's field: token ids for MaskGIT, latents for WALT.
  field = task.batch_fields[0]
  changed = dict(first, **{field: other_padding[field][::-1].copy()})
  assert task.eval_loss(model, [changed], mesh) != loss


def test_generate_returns_uint8_videos(untrained):
  task, model = untrained
  labels = np.array([0, 2, 1], np.int32)

  videos = task.generate(model, labels, jax.random.key(0))
  again = task.generate(model, labels, jax.random.key(0))

  chex.assert_shape(videos, (3, 5, 16, 16, 3))
  assert videos.dtype == np.uint8
  np.testing.assert_array_equal(videos, again)
  assert task.sampling_steps == task.config.sampling.num_steps


def test_sample_grid_pads_last_row():
  videos = np.random.default_rng(0).integers(1, 256, (10, 2, 4, 6, 3)).astype(np.uint8)
  grid = generation.sample_grid(videos, columns=4)

  chex.assert_shape(grid, (2, 3 * 4, 4 * 6, 3))
  np.testing.assert_array_equal(grid[:, 4:8, 6:12], videos[5])  # row 1, column 1
  np.testing.assert_array_equal(grid[:, 8:12, 6:12], videos[9])  # row 2, column 1
  assert not grid[:, 8:12, 12:].any(), "the two empty cells of the last row must be black"


def test_walt_clips_x0_only_for_lfq_codes():
  assert _task("walt").clip_x0 == 1.0
  assert _task("walt", **{"sampling.clip_lfq_x0": False}).clip_x0 is None
  continuous = dict(SMOKE_INFO, latent_kind="continuous")
  assert _task("walt", info=continuous).clip_x0 is None


def test_maskgit_codes_are_token_bits():
  task = _task("maskgit")
  tokens = _batch(SMOKE_INFO, 2)["tokens"]
  codes = task.outputs_to_codes(tokens)
  chex.assert_shape(codes, (2, 2, 2, 2, 6))
  np.testing.assert_array_equal(np.asarray(lfq.bits_to_ids(codes)), tokens)


# --- End to end: tokenizer, token cache, generator training ---


def _run(module, *args):
  command = [sys.executable, "-m", module, *args]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def token_cache_dir(tmp_path_factory):
  """A token cache written by a smoke tokenizer, shared by the end-to-end tests."""
  root = tmp_path_factory.mktemp("cache")
  _run("launch.train", "--config=configs/magvit.py:smoke", f"--workdir={root / 'tokenizer'}")
  _run("launch.tokenize", f"--workdir={root / 'tokenizer'}", f"--output={root / 'cache'}")
  return root / "cache"


@pytest.mark.parametrize("family", FAMILIES)
def test_smoke_training_checkpoints_and_samples(family, token_cache_dir, tmp_path):
  result = _run("launch.train", f"--config=configs/{family}.py:smoke", f"--workdir={tmp_path}",
                f"--config.data.token_cache.path={token_cache_dir}")
  config = _config(family)
  info = json.loads((token_cache_dir / "cache_info.json").read_text())

  checkpoints = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, use_async=False)
  assert checkpoints.latest_step() == config.train.num_steps
  checkpoints.close()

  gif_path = tmp_path / "samples" / f"samples_{family}_{config.train.num_steps:07d}.gif"
  assert str(gif_path) in result.stdout
  gif = Image.open(gif_path)
  tokenizer = magvit_configs.get_config("smoke")
  _, h, w = info["token_shape"]
  scale = tokenizer.data.height // h
  assert gif.n_frames == tokenizer.data.num_frames
  assert gif.size == (config.eval.num_samples * w * scale, h * scale)

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  final = [record for record in records
           if record["step"] == config.train.num_steps and "eval/token_cache/loss" in record]
  assert final, records[-1]
  assert math.isfinite(final[0]["eval/token_cache/loss"])
  assert final[0]["eval/sampling_seconds_per_video"] > 0
