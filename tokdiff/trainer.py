"""The one training loop shared by the tokenizer, MaskGIT and WALT.

A model package supplies a `Task` (model, loss, evaluation). This module owns the mesh, sharded
state, optimizer and EMA, the jitted step, checkpoints with exact resume, logging and NaN checks.
"""

import contextlib
import math
import os
import signal

import jax
import ml_collections
import numpy as np
import optax

from tokdiff import checkpoint as checkpoint_lib
from tokdiff import logger as logger_lib
from tokdiff import optim
from tokdiff import sharding as sharding_lib
from tokdiff import task as task_lib
from tokdiff import train_state
from tokdiff import validation
from tokdiff.data import pipeline


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


def make_train_step(task: task_lib.Task, factory: train_state.StateFactory, ema_decay: float):
  """Return the pure train step: loss, gradients, optimizer update and EMA, for jit."""
  tx = factory.tx

  def train_step(state: train_state.TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_of(params):
      model = factory.merge(params, state.model_state)
      return task.loss_fn(model, batch, rng)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=optim.update_ema(state.ema_params, params, ema_decay))
    return new_state, metrics

  return train_step


def jit_train_step(step_fn, factory: train_state.StateFactory, batch_example):
  """jit with the state's shardings in and out, batch sharded over data axes, state donated."""
  batch_sh = {key: sharding_lib.batch_sharding(factory.mesh, np.ndim(value))
              for key, value in batch_example.items()}
  return jax.jit(step_fn, in_shardings=(factory.shardings, batch_sh),
                 out_shardings=(factory.shardings, sharding_lib.replicated(factory.mesh)),
                 donate_argnums=0)


def make_state_factory(config: ml_collections.ConfigDict, task: task_lib.Task,
                       mesh: jax.sharding.Mesh) -> train_state.StateFactory:
  """Build the state factory of `task` on `mesh`, with the config's optimizer and axis rules."""
  tx = optim.make_optimizer(config.optimizer, config.train.num_steps)
  return train_state.StateFactory(task.build_model, tx, mesh,
                                  sharding_lib.rules_dict(config.mesh.axis_rules))


def load_ema_model(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """Load the EMA parameters of a checkpoint (default: the latest) on one device.

  Returns:
    (task, model, num_params): the config's task, its model with EMA parameters, and the
    parameter count.
  """
  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=1, use_async=False, create=False)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train there first "
                            "with `python -m launch.train`.")

  task = task_lib.make_task(config)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  factory = make_state_factory(config, task, mesh)
  state, _ = checkpoints.restore(step, factory.abstract_with_shardings())
  checkpoints.close()
  model = factory.merge(state.ema_params, state.model_state)
  return task, model, train_state.count_params(state.params)


class Trainer:
  """Runs one training job in one workdir; see `train_and_evaluate`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.task = task_lib.make_task(config)

    mesh_shape = validation.validate_common(config, jax.device_count(), jax.process_count())
    self.task.validate()
    self.mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, mesh_shape)))

    self.schedule = optim.learning_rate_schedule(config.optimizer, config.train.num_steps)
    self.factory = make_state_factory(config, self.task, self.mesh)
    self.checkpoints = checkpoint_lib.Checkpointer(
        self.workdir, keep=config.train.keep_checkpoints, use_async=config.train.async_checkpoints)
    self.logger = logger_lib.MetricLogger(self.workdir, is_primary=jax.process_index() == 0)
    self.config_dict = checkpoint_lib.config_to_dict(config)

  def make_loader(self):
    train = self.config.train
    return pipeline.make_train_loader(
        self.config.data, global_batch_size=train.batch_size, seed=self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def restore_or_init(self, data_iterator) -> train_state.TrainState:
    """Resume from the workdir's latest checkpoint if there is one, else initialise."""
    step = self.checkpoints.latest_step()
    if step is None:
      print(f"No checkpoint in {self.workdir}; initialising from seed {self.config.seed}.",
            flush=True)
      return self.factory.init(self.config.seed)

    self.checkpoints.check_compatible(step, self.config_dict)
    saved_steps = self.checkpoints.saved_config(step)["train"]["num_steps"]
    if saved_steps != self.config.train.num_steps:
      print(f"WARNING: train.num_steps changed from {saved_steps} to "
            f"{self.config.train.num_steps}; the learning-rate schedule now warms up and decays "
            "over the new length, so the run does not continue the old schedule.", flush=True)
    state, data_state = self.checkpoints.restore(step, self.factory.abstract_with_shardings())
    data_iterator.set_state(data_state)
    print(f"Resumed from step {step} in {self.checkpoints.directory}.", flush=True)
    return state

  def save(self, state, data_state) -> None:
    """Save `state` with the data-iterator state taken right after its last batch was read."""
    step = int(jax.device_get(state.step))
    self.checkpoints.save(step, state, data_state, self.config_dict)

  def evaluate(self, state, eval_data) -> dict[str, float]:
    step = int(jax.device_get(state.step))
    model = self.factory.merge(state.ema_params, state.model_state)
    context = task_lib.EvalContext(eval_batches=eval_data, workdir=self.workdir, step=step,
                                   mesh=self.mesh, writer=self.logger)
    results = self.task.evaluate(model, context)
    self.logger.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    metrics_text = ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items()))
    print(f"eval at step {step}: {metrics_text}", flush=True)
    return results

  def load_eval_data(self) -> dict[str, list[dict[str, np.ndarray]]]:
    ev = self.config.eval
    return {name: pipeline.eval_batches(self.config.data, source_name=name,
                                        batch_size=ev.batch_size, max_batches=ev.max_batches)
            for name in self.config.data.eval_sources}


def step_flops(config: ml_collections.ConfigDict) -> float:
  """Return the FLOPs of one compiled train step from XLA's cost analysis.

  For a step sharded over several devices XLA analyses one device's partition, so this is the
  count per device.
  """
  validation.validate_common(config, jax.device_count(), jax.process_count())
  task = task_lib.make_task(config)
  task.validate()
  mesh = sharding_lib.make_mesh({"data": config.mesh.data, "fsdp": config.mesh.fsdp,
                                 "tensor": config.mesh.tensor})
  factory = make_state_factory(config, task, mesh)

  loader = pipeline.make_train_loader(config.data, global_batch_size=config.train.batch_size,
                                      seed=config.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count())
  example = sharding_lib.device_fields(next(iter(loader)))
  abstract_batch = {
      key: jax.ShapeDtypeStruct((config.train.batch_size, *value.shape[1:]), value.dtype,
                                sharding=sharding_lib.batch_sharding(mesh, value.ndim))
      for key, value in example.items()}

  step_fn = make_train_step(task, factory, config.optimizer.ema_decay)
  compiled = jit_train_step(step_fn, factory, example).lower(
      factory.abstract_with_shardings(), abstract_batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _check_finite(step: int, metrics: dict[str, float]) -> None:
  loss = metrics["loss"]
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; training stopped and the last good checkpoint is kept. "
        "Lower optimizer.learning_rate or optimizer.grad_clip_norm, or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train `config.model_family` in `workdir`, resuming if it contains a checkpoint.

  Returns the final evaluation results.
  """
  trainer = Trainer(config, workdir)
  loader = trainer.make_loader()
  data_iterator = iter(loader)
  state = trainer.restore_or_init(data_iterator)
  eval_data = trainer.load_eval_data()
  try:
    return _run_loop(trainer, state, data_iterator, eval_data)
  finally:
    trainer.checkpoints.close()
    trainer.logger.close()


@contextlib.contextmanager
def _stop_requests():
  """Turn SIGINT/SIGTERM into a flag that the loop checks between steps.

  Stopping between steps keeps the saved state and data position consistent; a second Ctrl-C
  interrupts at once.
  """
  requested = []

  def handler(signum, frame):
    del frame
    if requested:
      raise KeyboardInterrupt
    requested.append(signal.Signals(signum).name)
    print("Stop requested; finishing the current step and saving a checkpoint.", flush=True)

  previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield requested
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def _run_loop(trainer: Trainer, state, data_iterator, eval_data) -> dict[str, float]:
  train = trainer.config.train
  start = int(jax.device_get(state.step))
  if start >= train.num_steps:
    print(f"Checkpoint is at step {start} >= train.num_steps={train.num_steps}; evaluating only.")
    return trainer.evaluate(state, eval_data)

  step_fn = make_train_step(trainer.task, trainer.factory, trainer.config.optimizer.ema_decay)
  data_state = data_iterator.get_state()
  train_step = None
  num_params = train_state.count_params(state.params)
  print(f"{trainer.config.model_family}: {num_params:,} parameters, mesh "
        f"{dict(trainer.mesh.shape)}, steps {start} -> {train.num_steps}", flush=True)
  initial = trainer.evaluate(state, eval_data) if start == 0 else {}

  progress = logger_lib.Progress(start, train.num_steps, enabled=train.progress_bar)
  results = {}
  with _stop_requests() as stop:
    try:
      for step in range(start + 1, train.num_steps + 1):
        batch = next(data_iterator)
        if train_step is None:
          train_step = jit_train_step(step_fn, trainer.factory, sharding_lib.device_fields(batch))
        state, metrics = train_step(state, sharding_lib.global_batch(batch, trainer.mesh))
        data_state = data_iterator.get_state()
        host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(step, host_metrics)
        progress.advance(step)

        if step % train.log_every == 0 or step == train.num_steps:
          host_metrics["learning_rate"] = float(trainer.schedule(step - 1))
          line, timing = progress.interval_line(step, host_metrics)
          progress.write(line)
          trainer.logger.write_scalars(step, {**host_metrics, **timing})
        if train.max_steps_per_run and step - start >= train.max_steps_per_run:
          stop.append("max_steps_per_run")
        if step % train.checkpoint_every == 0 or step == train.num_steps or stop:
          trainer.save(state, data_state)
        if step % train.eval_every == 0 or step == train.num_steps:
          results = trainer.evaluate(state, eval_data)
        if stop:
          print(f"Stopped at step {step} ({stop[0]}); saved to {trainer.checkpoints.directory}. "
                "Run the same command to resume.", flush=True)
          if stop[0] == "max_steps_per_run":
            return results
          raise KeyboardInterrupt
    finally:
      progress.close()
  _print_summary(initial, results, trainer.workdir)
  return results


def _print_summary(initial: dict[str, float], final: dict[str, float], workdir: str) -> None:
  """Print each eval metric at the start and end of this run side by side."""
  if not final:
    return
  lines = [f"  {key}: {initial[key]:.4g} -> {value:.4g}" if key in initial else
           f"  {key}: {value:.4g}" for key, value in sorted(final.items())]
  print("Eval at start -> end of this run:\n" + "\n".join(lines) +
        f"\nMetrics: {os.path.join(workdir, 'metrics.jsonl')}, GIFs: "
        f"{os.path.join(workdir, 'samples')}", flush=True)


