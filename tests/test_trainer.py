"""Shared trainer: sharded steps agree across meshes, resume is exact, bad runs stop cleanly."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from configs import magvit as magvit_configs
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import optim
from tokdiff import sharding as sharding_lib
from tokdiff import task as task_lib
from tokdiff import train_state
from tokdiff import trainer as trainer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  config = magvit_configs.get_config("smoke")
  with config.unlocked():
    for name, value in overrides.items():
      node = config
      *parents, leaf = name.split(".")
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


def _run_steps(config, devices, mesh_shape, batch, num_steps):
  task = task_lib.make_task(config)
  mesh = sharding_lib.make_mesh(mesh_shape, devices)
  rules = sharding_lib.rules_dict(config.mesh.axis_rules)
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  factory = train_state.StateFactory(task.build_model, tx, mesh, rules)
  step_fn = trainer_lib.make_train_step(task, factory, config.optimizer.ema_decay)
  train_step = trainer_lib.jit_train_step(step_fn, factory, batch)

  state = factory.init(config.seed)
  losses = []
  for _ in range(num_steps):
    state, metrics = train_step(state, sharding_lib.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 4, "tensor": 1},
                                        {"data": 2, "fsdp": 1, "tensor": 4}])
def test_eight_device_mesh_matches_one_device(mesh_shape):
  config = smoke_config(**{"optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-4})
  rng = np.random.default_rng(0)
  batch = {"video": rng.uniform(-1, 1, (8, 5, 16, 16, 3)).astype(np.float32),
           "label": np.zeros((8,), np.int32)}

  single, single_losses = _run_steps(config, jax.devices()[:1],
                                     {"data": 1, "fsdp": 1, "tensor": 1}, batch, 1)
  sharded, sharded_losses = _run_steps(config, jax.devices(), mesh_shape, batch, 1)

  # The 8-device run must really shard parameters, or the comparison proves nothing.
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)]
  assert any(any(axis is not None for axis in spec) for spec in specs)

  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  # Adam's moments are functions of the gradients alone, so they pin down the sharded
  # gradient, including its scale, which Adam's normalised update would hide.
  chex.assert_trees_all_close(jax.device_get(sharded.opt_state),
                              jax.device_get(single.opt_state), atol=1e-7, rtol=1e-4)
  # A gradient within rounding of zero can flip sign between meshes, and Adam then moves
  # that weight by +lr or -lr, so parameters agree to within the step size.
  chex.assert_trees_all_close(jax.device_get(sharded.params), jax.device_get(single.params),
                              atol=2.5e-4, rtol=0)


def _train(workdir, *overrides, check=True):
  command = [sys.executable, "-m", "launch.train", "--config=configs/magvit.py:smoke",
             f"--workdir={workdir}", *overrides]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _losses(workdir):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _restore(workdir, step):
  config = smoke_config()
  task = task_lib.make_task(config)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  factory = train_state.StateFactory(task.build_model, tx, mesh,
                                     sharding_lib.rules_dict(config.mesh.axis_rules))
  checkpoints = checkpoint_lib.Checkpointer(str(workdir), keep=3, use_async=False)
  state, data_state = checkpoints.restore(step, factory.abstract_with_shardings())
  checkpoints.close()
  return jax.device_get(state), data_state


def test_resume_in_fresh_process_is_exact(tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  _train(straight)
  first = _train(split, "--config.train.max_steps_per_run=3")
  assert "Stopped at step 3" in first.stdout
  _train(split)

  assert sorted(_losses(straight)) == [1, 2, 3, 4]
  assert _losses(split) == _losses(straight)

  straight_state, straight_data = _restore(straight, 4)
  split_state, split_data = _restore(split, 4)
  assert int(split_state.step) == 4
  chex.assert_trees_all_equal(split_state.params, straight_state.params)
  chex.assert_trees_all_equal(split_state.ema_params, straight_state.ema_params)
  chex.assert_trees_all_equal(split_state.opt_state, straight_state.opt_state)
  chex.assert_trees_all_equal(split_state.rng, straight_state.rng)
  assert split_data == straight_data


def test_incompatible_checkpoint_names_fields(tmp_path):
  _train(tmp_path, "--config.train.num_steps=2")
  result = _train(tmp_path, "--config.model.latent_bits=5", check=False)
  assert result.returncode != 0
  assert "model.latent_bits: checkpoint has 6, config has 5" in result.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = smoke_config(**{"optimizer.learning_rate": 1e30, "train.num_steps": 50,
                           "train.checkpoint_every": 1, "train.async_checkpoints": False})
  with pytest.raises(trainer_lib.NonFiniteLossError, match="last good checkpoint"):
    trainer_lib.train_and_evaluate(config, str(tmp_path))

  losses = _losses(tmp_path)
  last_saved = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, use_async=False).latest_step()
  assert last_saved is not None and last_saved < 50
  assert all(np.isfinite(losses[s]) for s in losses if s <= last_saved)
  state, _ = _restore(tmp_path, last_saved)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_sigterm_saves_and_resumes(tmp_path):
  command = [sys.executable, "-m", "launch.train", "--config=configs/magvit.py:smoke",
             f"--workdir={tmp_path}", "--config.train.num_steps=100000",
             "--config.train.checkpoint_every=100000"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output = []
  for line in process.stdout:
    output.append(line)
    if line.startswith("step 3/"):
      process.terminate()
  assert process.wait(timeout=300) == 130, "".join(output)[-3000:]
  assert any("Stopped at step" in line for line in output), "".join(output)[-3000:]

  saved = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, use_async=False).latest_step()
  assert saved is not None and saved >= 3
