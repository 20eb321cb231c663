"""Process set-up shared by the launch scripts."""

import logging
import os

import jax


def setup_runtime() -> None:
  """Join a multi-process job when one is configured, and make logs readable."""
  # Orbax and grain log every save and restore at INFO through absl; keep the console to
  # warnings and the trainer's own progress lines.
  logging.getLogger("absl").setLevel(logging.WARNING)

  # A multi-process run outside a managed cluster names its coordinator in the environment;
  # this must happen before anything touches the JAX backend.
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  print(f"JAX process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} "
        f"local / {jax.device_count()} global devices ({jax.default_backend()}).", flush=True)
