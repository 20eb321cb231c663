"""Atomic, asynchronous checkpoints of the train state, data-iterator state and config (orbax).

Resume order: a workdir that already contains a checkpoint always resumes from its latest step;
otherwise training starts from scratch with `config.seed`. Orbax writes each step into a temporary
folder and renames it when complete, so an interrupted save never leaves a half-written step
behind as the latest one.
"""

import json
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

# Fields that may change between a run and its resumption without changing what is trained.
RESUMABLE_PREFIXES = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoints", "train.progress_bar",
    "train.max_steps_per_run",
    "eval.", "mesh.data", "mesh.fsdp", "mesh.tensor", "data.cache_dir",
    "data.eval_sources",
)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """JSON-compatible dict of a config (tuples become lists)."""
  return json.loads(config.to_json())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def incompatible_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Names and values of fields that differ between a saved and a current config."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  differing = []
  for name in sorted(set(saved_flat) | set(current_flat)):
    if name.startswith(RESUMABLE_PREFIXES):
      continue
    old, new = saved_flat.get(name, "<missing>"), current_flat.get(name, "<missing>")
    if old != new:
      differing.append(f"{name}: checkpoint has {old!r}, config has {new!r}")
  return differing


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a run with a different model, data or optimizer."""


class _IteratorState:
  """Adapter that lets grain's orbax handler save a captured iterator state and return one.

  The trainer captures the state right after reading each step's batch, so the saved position
  matches the saved train state even if the loader has read ahead. Grain writes one file per
  process, because each process reads its own shard.
  """

  def __init__(self, state: bytes | None = None):
    self.state = state

  def get_state(self) -> bytes | None:
    return self.state

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


class Checkpointer:
  """Keeps the latest N checkpoints of one workdir."""

  def __init__(self, workdir: str, *, keep: int, use_async: bool, create: bool = True):
    """Open the checkpoints of `workdir`; readers pass create=False to leave no folder behind."""
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"no checkpoints folder in {os.path.abspath(workdir)}; train "
                              "there first with `python -m launch.train`, or check --workdir.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=use_async)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: bytes, config: dict[str, Any]) -> bool:
    """Start saving `step`; with async checkpoints this returns before the write finishes."""
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
            config=ocp.args.JsonSave(config)),
        force=True)

  def saved_config(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def check_compatible(self, step: int, config: dict[str, Any]) -> None:
    """Raise IncompatibleCheckpointError naming every field that differs from the checkpoint."""
    differing = incompatible_fields(self.saved_config(step), config)
    if differing:
      raise IncompatibleCheckpointError(
          f"the checkpoint at step {step} in {self.directory} was written with a different "
          "config:\n  " + "\n  ".join(differing) +
          "\nUse a new --workdir for a different run, or restore those values to resume.")

  def restore(self, step: int, abstract_state) -> tuple[Any, bytes]:
    """Restore the train state into `abstract_state`'s shardings, and this process's
    data-iterator state."""
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(_IteratorState())))
    except ValueError as error:
      if "process_" not in str(error):
        raise
      raise IncompatibleCheckpointError(
          f"step {step} in {self.directory} has no data-iterator state for this process "
          f"({error}); resume with the same number of processes that wrote it.") from error
    return restored["state"], restored["data"].state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
