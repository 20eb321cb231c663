"""Shared core: data pipeline, mesh and sharding, trainer, checkpoints, metrics and video I/O."""

import flax

# Parameters carry logical axis names, and the trainer maps them onto the mesh after
# `eval_shape`. Modules are also built outside any mesh (tests, inference), so flax must not
# try to shard variables eagerly when they are created.
flax.config.update("flax_always_shard_variable", False)
