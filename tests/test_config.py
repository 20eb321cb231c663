"""Config validation: bad values fail before compiling, with the value and a valid alternative."""

import re

import jax
import pytest

from configs import magvit as magvit_configs
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import sharding as sharding_lib
from tokdiff import trainer as trainer_lib
from tokdiff.sharding import ConfigError


def smoke_config(**overrides):
  config = magvit_configs.get_config("smoke")
  with config.unlocked():
    for name, value in overrides.items():
      section, field = name.split(".")
      config[section][field] = value
  return config


@pytest.mark.parametrize("num_frames,message", [
    (8, "data.num_frames=8 is not of the form 1+4k; use 5 or 9"),
    (0, "data.num_frames=0 is not of the form 1+4k; use 1 or 5"),
])
def test_frame_count_rejected(tmp_path, num_frames, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    trainer_lib.Trainer(smoke_config(**{"data.num_frames": num_frames}), str(tmp_path))


def test_mesh_not_dividing_devices_rejected(tmp_path):
  assert jax.device_count() == 8
  config = smoke_config(**{"mesh.data": 3})
  with pytest.raises(ConfigError, match="3 devices but 8 are available"):
    trainer_lib.Trainer(config, str(tmp_path))

  config = smoke_config(**{"mesh.data": -1, "mesh.tensor": 3})
  with pytest.raises(ConfigError, match="do not divide the 8 devices"):
    trainer_lib.Trainer(config, str(tmp_path))


def test_batch_not_dividing_data_parallel_rejected(tmp_path):
  config = smoke_config(**{"train.batch_size": 12})
  with pytest.raises(ConfigError, match=r"train\.batch_size=12 .* use a multiple of 8, e\.g\. 8"):
    trainer_lib.Trainer(config, str(tmp_path))

  # With 4-way tensor parallelism only 2 data-parallel shards remain, so 12 works.
  config = smoke_config(**{"train.batch_size": 12, "mesh.data": 2, "mesh.tensor": 4,
                           "eval.batch_size": 4})
  trainer_lib.Trainer(config, str(tmp_path))


def test_unknown_override_rejected():
  config = magvit_configs.get_config("tiny")
  with pytest.raises(AttributeError):
    config.train.num_stpes = 5


def test_spatial_size_rejected(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.height=20 is not divisible .* factor 8; use 16"):
    trainer_lib.Trainer(smoke_config(**{"data.height": 20}), str(tmp_path))


def test_mesh_fill_and_logical_rules():
  assert sharding_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.rules_dict((("embed", "fsdp"), ("mlp", "tensor")))

  spec = sharding_lib.logical_to_mesh_spec(("embed", "mlp"), (4, 6), rules, mesh)
  assert tuple(spec) == ("fsdp", "tensor")
  # A dimension the mesh axis does not divide stays replicated instead of failing.
  spec = sharding_lib.logical_to_mesh_spec(("embed", "mlp"), (3, 6), rules, mesh)
  assert tuple(spec) == (None, "tensor")

  with pytest.raises(ConfigError, match="names mesh axis 'model'"):
    sharding_lib.rules_dict((("embed", "model"),))


def test_incompatible_fields_listed():
  saved = {"model": {"latent_bits": 6, "base_channels": 8}, "train": {"num_steps": 4}}
  current = {"model": {"latent_bits": 5, "base_channels": 8}, "train": {"num_steps": 99}}
  assert checkpoint_lib.incompatible_fields(saved, current) == [
      "model.latent_bits: checkpoint has 6, config has 5"]
