"""Train state as plain pytrees, built through `eval_shape` and placed sharded on the mesh.

The state contains nested dicts of arrays, not NNX modules, so optax, orbax and jit all see ordinary
pytrees. A model is rebuilt inside a traced function with `nnx.merge(graphdef, params, rest)`.
"""

from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from tokdiff import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates applied
  params: dict[str, Any]
  ema_params: dict[str, Any]
  opt_state: Any
  model_state: dict[str, Any]  # non-parameter variables (e.g. RNG counters)
  rng: jax.Array  # uint32 key data; per-step keys are folded in from `step`


def _nested_from_flat(flat: list[tuple[tuple, Any]]) -> dict:
  nested: dict = {}
  for path, value in flat:
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested


def _logical_axes(state: nnx.State) -> dict:
  """Nested dict of each variable's logical axis names (None when it has none)."""
  flat = [(path, var.get_metadata().get("out_sharding")) for path, var in state.flat_state()]
  return _nested_from_flat(flat)


class StateFactory:
  """Builds the abstract, sharded and initial train state of one task's model."""

  def __init__(self, build_model, tx: optax.GradientTransformation, mesh: Mesh,
               rules: dict[str, object]):
    self._build_model = build_model
    self.tx = tx
    self.mesh = mesh
    self.rules = rules

    abstract_model = nnx.eval_shape(lambda: build_model(nnx.Rngs(0)))
    self.graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    self._param_axes = _logical_axes(params)
    self._rest_axes = _logical_axes(rest)

    self.abstract = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
    self.shardings = self._state_shardings()

  def merge(self, params, model_state) -> nnx.Module:
    """Rebuild the NNX model from state dicts (inside or outside a traced function)."""
    return nnx.merge(self.graphdef, params, model_state)

  def _init(self, key_data: jax.Array) -> TrainState:
    key = jax.random.wrap_key_data(key_data)
    init_key, train_key = jax.random.split(key)
    model = self._build_model(nnx.Rngs(init_key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=self.tx.init(params),
        model_state=rest.to_pure_dict(),
        rng=jax.random.key_data(train_key))

  def _spec_tree(self, axes_tree, shapes_tree):
    def to_sharding(axes, shape):
      spec = sharding_lib.logical_to_mesh_spec(axes, shape.shape, self.rules, self.mesh)
      return NamedSharding(self.mesh, spec)
    return jax.tree.map(to_sharding, axes_tree, shapes_tree,
                        is_leaf=lambda x: x is None or isinstance(x, tuple))

  def _state_shardings(self) -> TrainState:
    param_sh = self._spec_tree(self._param_axes, self.abstract.params)
    rest_sh = self._spec_tree(self._rest_axes, self.abstract.model_state)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    params_def = jax.tree.structure(self.abstract.params)

    # Optimizer moments mirror the parameter tree; counters and the like are replicated.
    def opt_sharding(node):
      if jax.tree.structure(node) == params_def:
        return param_sh
      return jax.tree.map(lambda _: replicated, node)
    opt_sh = jax.tree.map(opt_sharding, self.abstract.opt_state,
                          is_leaf=lambda n: jax.tree.structure(n) == params_def)

    return TrainState(step=replicated, params=param_sh, ema_params=param_sh, opt_state=opt_sh,
                      model_state=rest_sh, rng=replicated)

  def init(self, seed: int) -> TrainState:
    """Initialise parameters directly in their shards (never whole on one device)."""
    key_data = jax.random.key_data(jax.random.key(seed))

    # Initialisation runs once, so XLA's CPU optimisation passes (about 15 s for the tiny
    # tokenizer on 2 cores, against about 2 s without them) are not worth their time.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    init = jax.jit(self._init, out_shardings=self.shardings, compiler_options=options)
    return init(key_data)

  def abstract_with_shardings(self) -> TrainState:
    """ShapeDtypeStructs carrying this mesh's shardings: the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
