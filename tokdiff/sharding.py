"""Device mesh from the config, and logical axis rules that map parameter and batch axes onto it.

Parameters carry logical axis names (for example ("embed", "mlp")); the config's rules name the
mesh axis each name is split over. A mesh axis is dropped for a dimension it does not divide, so a
small layer stays replicated instead of failing to compile.
"""

from collections.abc import Sequence
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Batch dimension of every input array: split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")


class ConfigError(ValueError):
  """A configuration value that cannot work, caught before anything is compiled."""


def resolve_mesh_shape(mesh_shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Return the (data, fsdp, tensor) sizes, with at most one -1 filled from the device count."""
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")

  sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
  fill = [i for i, size in enumerate(sizes) if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has more than one -1; set all but one.")
  if any(size == 0 or size < -1 for size in sizes):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has a size below 1 other than -1.")

  known = math.prod(size for size in sizes if size != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
          f"the {num_devices} devices; use sizes whose product divides {num_devices}.")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} uses {known} devices but {num_devices} are "
        f"available; set one axis to -1 to use all of them, e.g. data=-1.")
  return tuple(sizes)


def make_mesh(mesh_shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build the (data, fsdp, tensor) mesh with automatic sharding propagation."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_shape, len(devices))

  # jax.make_mesh defaults to explicit axis types, under which contractions over sharded
  # dimensions need explicit output shardings; the models rely on automatic propagation.
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: the product of the mesh's data-parallel axes."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                         rules: dict[str, object], mesh: Mesh) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec, dropping mesh axes that do not divide a dim."""
  if logical is None:
    return PartitionSpec()

  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())

    # A mesh axis may appear only once per array, and must divide the dimension.
    kept = []
    for axis in axes:
      if axis in used or mesh.shape[axis] == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        continue
      kept.append(axis)
    used.update(kept)
    if len(kept) > 1:
      spec.append(tuple(kept))
    elif kept:
      spec.append(kept[0])
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def rules_dict(axis_rules: Sequence[Sequence[object]]) -> dict[str, object]:
  """Turn the config's [(logical_name, mesh_axes), ...] list into a lookup table."""
  table = {}
  for rule in axis_rules:
    name, axes = rule
    for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
      if axis not in MESH_AXES:
        raise ConfigError(f"axis rule {tuple(rule)} names mesh axis {axis!r}; use one of "
                          f"{MESH_AXES}.")
    table[name] = axes
  return table


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch array: first dimension over the data-parallel axes, rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def device_fields(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Select the batch entries that become device arrays; strings such as clip ids stay on the host."""
  return {key: value for key, value in batch.items()
          if np.asarray(value).dtype.kind not in "OUS"}


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's local numpy batch into global arrays sharded over the batch axes."""
  arrays = {}
  for key, value in device_fields(local_batch).items():
    value = np.asarray(value)
    arrays[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return arrays


def host_to_global(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """Shard an array that every process has in full (e.g. a deterministic eval batch)."""
  array = np.asarray(array)
  sharding = batch_sharding(mesh, array.ndim)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
