"""The contract between the shared trainer and a model package.

Each package (magvit, maskgit, walt) supplies one `Task`: it builds its model from explicit config
fields, computes its loss on a batch, and evaluates. The trainer owns everything else: mesh,
sharding, optimizer, EMA, checkpoints, logging and the loop.
"""

import dataclasses
import importlib
from typing import Any, Protocol

from flax import nnx
import jax
import ml_collections
import numpy as np

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# model_family -> module that defines `make_task(config) -> Task`.
TASK_MODULES = {
    "magvit": "magvit.task",
    "maskgit": "maskgit.task",
    "walt": "walt.task",
}


@dataclasses.dataclass
class EvalContext:
  """Inputs of an evaluation besides the model, and the writer for its pictures."""
  eval_batches: dict[str, list[dict[str, np.ndarray]]]  # source name -> host batches
  workdir: str
  step: int
  mesh: jax.sharding.Mesh
  writer: Any  # tokdiff.logger.MetricLogger, for images and GIFs


class Task(Protocol):
  """Model, loss and evaluation that a model package supplies to the trainer."""

  def validate(self) -> None:
    """Raise ConfigError for model fields that cannot work, before anything is compiled."""

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Build the model from explicit config fields."""

  def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
    """Return the scalar loss to minimise and scalar metrics for logging."""

  def evaluate(self, model: nnx.Module, context: EvalContext) -> dict[str, float]:
    """Evaluate the (EMA) model; write pictures through `context.writer`."""


def make_task(config: ml_collections.ConfigDict) -> Task:
  """Import the package named by `config.model_family` and build its task."""
  family = config.model_family
  if family not in TASK_MODULES:
    raise ValueError(f"config.model_family={family!r} is unknown; use one of "
                     f"{sorted(TASK_MODULES)}.")
  module = importlib.import_module(TASK_MODULES[family])
  return module.make_task(config)
