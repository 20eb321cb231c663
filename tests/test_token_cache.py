"""Tests for the token cache: `launch.tokenize`, tokdiff/data/token_cache.py and its grain source.

One smoke tokenizer is trained per module, and `launch.tokenize` builds an 'lfq' and a
'continuous' cache from it, all as subprocesses, the way a user runs them.
"""

import json
import os
import shutil
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import magvit as magvit_configs
from magvit import inference
from magvit import lfq
from tokdiff import validation
from tokdiff.data import pipeline
from tokdiff.data import token_cache
from tokdiff.data import transforms
from tokdiff.sharding import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN_CLIPS = 16  # the smoke config's Atari clip counts
NUM_EVAL_CLIPS = 8
TOKEN_SHAPE = (2, 2, 2)  # 5x16x16 clips through temporal factor 4 and spatial factor 8
LATENT_BITS = 6

# Re-encoding in this process batches clips differently from launch.tokenize, which can move a
# latent by float rounding. Token ids are compared only where every channel is farther than
# this from 0, where rounding cannot flip a sign.
SIGN_MARGIN = 1e-4


def run_module(module: str, *args: str, env: dict | None = None) -> str:
  """Run `python -m module args` from the repository root and return its output."""
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, f"{module} failed with exit code {result.returncode}:\n{output}"
  return output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def tokenizer_dir(workspace):
  """A smoke tokenizer; its Atari clips are cached on disk so that launch.tokenize reuses them."""
  workdir = workspace / "tokenizer"
  # One device trains the 4 smoke steps faster than the 8 fake devices of conftest.
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  run_module("launch.train", "--config=configs/magvit.py:smoke", f"--workdir={workdir}",
             f"--config.data.cache_dir={workspace / 'atari'}", env=env)
  return str(workdir)


def build_cache(tokenizer_dir, output, *flags):
  # The 8 fake devices of conftest are inherited, so encoding runs sharded. --batch_size=12
  # rounds up to 16, which pads the 8 eval clips to one full batch.
  return run_module("launch.tokenize", f"--workdir={tokenizer_dir}", f"--output={output}",
                    "--batch_size=12", *flags)


@pytest.fixture(scope="module")
def lfq_cache(tokenizer_dir, workspace):
  output = workspace / "cache_lfq"
  log = build_cache(tokenizer_dir, output)
  assert "Wrote token cache" in log
  return str(output)


@pytest.fixture(scope="module")
def continuous_cache(tokenizer_dir, workspace):
  output = workspace / "cache_continuous"
  build_cache(tokenizer_dir, output, "--latent=continuous")
  return str(output)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  model, _ = inference.load_tokenizer(tokenizer_dir)
  return model


@pytest.fixture(scope="module")
def reencoded(tokenizer, lfq_cache):
  """Per split: the source's labels and clip ids, and z and ids re-encoded in this process."""
  data = cache_data_config(lfq_cache)
  spec = pipeline.clip_spec(data, train=False)
  results = {}
  for split in token_cache.SPLITS:
    source = pipeline.make_source(data, split)
    records = [source[index] for index in range(len(source))]
    clips = np.stack([transforms.process_clip(record["video"], spec, None, record["clip_id"])
                      for record in records])
    z = tokenizer.encode(jnp.asarray(clips))
    _, ids, _ = tokenizer.quantize(z)
    results[split] = {
        "z": np.asarray(z),
        "ids": np.asarray(ids),
        "labels": [record["label"] for record in records],
        "clip_ids": [record["clip_id"] for record in records],
    }
  return results


def cache_data_config(cache_path):
  return ml_collections.ConfigDict(token_cache.read_cache_info(cache_path)["data_config"])


def read_split(cache_path, split):
  source = token_cache.TokenCacheSource(cache_path, split)
  return [source[index] for index in range(len(source))]


def cache_data(cache_path):
  """A `data` config section that reads the cache, as a generator config sets it."""
  data = cache_data_config(cache_path)
  data.source = "token_cache"
  data.token_cache.path = cache_path
  return data


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for batch_a, batch_b in zip(first, second):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Cache contents


def test_cache_info_describes_tokenizer_and_data(lfq_cache, tokenizer, tokenizer_dir):
  info = token_cache.read_cache_info(lfq_cache)

  # The fingerprint written by launch.tokenize matches one computed in this process.
  assert info["tokenizer_fingerprint"] == inference.tokenizer_fingerprint(tokenizer)
  assert info["tokenizer_workdir"] == os.path.abspath(tokenizer_dir)
  assert info["checkpoint_step"] == 4
  assert info["latent_kind"] == "lfq"
  assert info["latent_stats"] is None
  assert tuple(info["token_shape"]) == TOKEN_SHAPE
  assert info["latent_bits"] == LATENT_BITS
  assert info["num_clips"] == {"train": NUM_TRAIN_CLIPS, "eval": NUM_EVAL_CLIPS}
  assert (info["temporal_factor"], info["spatial_factor"]) == (4, 8)
  assert (info["num_frames"], info["height"], info["width"]) == (5, 16, 16)
  games = list(magvit_configs.get_config("smoke").data.atari.games)
  assert info["class_names"] == games
  assert info["num_classes"] == len(games)
  assert info["data_config"]["source"] == "atari"
  assert info["path"] == os.path.abspath(lfq_cache)


@pytest.mark.parametrize("split", token_cache.SPLITS)
def test_tokens_match_reencoded_clips(lfq_cache, reencoded, split):
  records = read_split(lfq_cache, split)
  expected = reencoded[split]

  tokens = np.stack([record["tokens"] for record in records])
  chex.assert_shape(tokens, (len(expected["ids"]), *TOKEN_SHAPE))
  assert tokens.dtype == np.int32
  clear_of_zero = np.all(np.abs(expected["z"]) > SIGN_MARGIN, axis=-1)
  assert clear_of_zero.mean() > 0.9
  np.testing.assert_array_equal(tokens[clear_of_zero], expected["ids"][clear_of_zero])
  assert [record["label"] for record in records] == expected["labels"]
  assert [record["clip_id"] for record in records] == expected["clip_ids"]


def test_lfq_latents_are_token_codes(lfq_cache):
  for split in token_cache.SPLITS:
    records = read_split(lfq_cache, split)
    tokens = np.stack([record["tokens"] for record in records])
    latents = np.stack([record["latents"] for record in records])

    chex.assert_shape(latents, (len(records), *TOKEN_SHAPE, LATENT_BITS))
    assert latents.dtype == np.float32
    np.testing.assert_array_equal(latents, np.asarray(lfq.ids_to_bits(tokens, LATENT_BITS)))


def test_continuous_latents_denormalize_to_z(continuous_cache, lfq_cache, reencoded):
  info = token_cache.read_cache_info(continuous_cache)
  assert info["latent_kind"] == "continuous"
  chex.assert_shape([np.asarray(info["latent_stats"]["mean"]),
                     np.asarray(info["latent_stats"]["std"])], [(LATENT_BITS,)] * 2)

  for split in token_cache.SPLITS:
    records = read_split(continuous_cache, split)
    latents = np.stack([record["latents"] for record in records])
    z = np.asarray(token_cache.denormalize(latents, info))

    np.testing.assert_allclose(z, reencoded[split]["z"], atol=1e-4)
    lfq_tokens = np.stack([record["tokens"] for record in read_split(lfq_cache, split)])
    np.testing.assert_array_equal(np.stack([record["tokens"] for record in records]),
                                  lfq_tokens)

  # The statistics are the train split's, so the stored train latents are standardised.
  train = np.stack([record["latents"] for record in read_split(continuous_cache, "train")])
  flat = train.reshape(-1, LATENT_BITS)
  np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=1e-3)


def test_latents_to_codes_inverts_both_kinds(continuous_cache, lfq_cache):
  rng = np.random.default_rng(0)
  codes = rng.choice([-1.0, 1.0], size=(3, *TOKEN_SHAPE, LATENT_BITS)).astype(np.float32)
  # Keep every latent at least 0.25 from 0, so its sign is exact after normalisation.
  z = codes * rng.uniform(0.25, 2.0, size=codes.shape).astype(np.float32)

  for cache in (lfq_cache, continuous_cache):
    info = token_cache.read_cache_info(cache)
    model_output = token_cache.normalize(z if info["latent_kind"] == "continuous" else codes,
                                         info)
    recovered = jax.jit(lambda latents, info=info: token_cache.latents_to_codes(latents, info))(
        model_output)
    np.testing.assert_array_equal(np.asarray(recovered), codes, err_msg=info["latent_kind"])

    # Stored latents map back to the codes of the stored tokens.
    records = read_split(cache, "eval")
    latents = np.stack([record["latents"] for record in records])
    tokens = np.stack([record["tokens"] for record in records])
    from_latents = np.asarray(token_cache.latents_to_codes(latents, info))
    clear_of_zero = np.abs(np.asarray(token_cache.denormalize(latents, info))) > SIGN_MARGIN
    expected = np.asarray(lfq.ids_to_bits(tokens, LATENT_BITS))
    np.testing.assert_array_equal(from_latents[clear_of_zero], expected[clear_of_zero])


def test_latents_to_codes_rejects_wrong_channel_count(lfq_cache):
  info = token_cache.read_cache_info(lfq_cache)

  with pytest.raises(ValueError, match="latent_bits=6"):
    token_cache.latents_to_codes(np.zeros((2, LATENT_BITS + 1)), info)


# ---------------------------------------------------------------------------------------------
# Training loader and evaluation batches


def test_train_loader_batch_format(lfq_cache):
  loader = pipeline.make_train_loader(cache_data(lfq_cache), global_batch_size=4, seed=0,
                                      process_index=0, process_count=1)

  batch = next(iter(loader))

  assert set(batch) == {"tokens", "latents", "label"}
  chex.assert_shape(batch["tokens"], (4, *TOKEN_SHAPE))
  chex.assert_shape(batch["latents"], (4, *TOKEN_SHAPE, LATENT_BITS))
  chex.assert_shape(batch["label"], (4,))
  assert batch["tokens"].dtype == np.int32
  assert batch["latents"].dtype == np.float32
  assert batch["label"].dtype == np.int32


def test_train_loader_is_deterministic(continuous_cache):
  data = cache_data(continuous_cache)
  kwargs = dict(global_batch_size=4, process_index=0, process_count=1)

  first = take(iter(pipeline.make_train_loader(data, seed=1, **kwargs)), 6)
  second = take(iter(pipeline.make_train_loader(data, seed=1, **kwargs)), 6)
  other_seed = take(iter(pipeline.make_train_loader(data, seed=2, **kwargs)), 6)

  assert_batches_equal(first, second)
  assert any(not np.array_equal(a["latents"], b["latents"]) for a, b in zip(first, other_seed))


def test_train_loader_resumes_from_json_state(continuous_cache):
  data = cache_data(continuous_cache)
  kwargs = dict(global_batch_size=3, seed=0, process_index=0, process_count=1)
  iterator = iter(pipeline.make_train_loader(data, **kwargs))
  take(iterator, 4)

  saved = pipeline.loader_state_to_json(iterator.get_state())
  expected = take(iterator, 3)

  # The state survives a JSON round trip, as in a checkpoint.
  resumed = iter(pipeline.make_train_loader(data, **kwargs))
  resumed.set_state(pipeline.loader_state_from_json(json.loads(json.dumps(saved))))
  assert_batches_equal(take(resumed, 3), expected)


def test_train_loader_shards_are_disjoint(continuous_cache):
  data = cache_data(continuous_cache)
  # Continuous latents are distinct floats for distinct clips, so they identify the record.
  index_of_latents = {record["latents"].tobytes(): index
                      for index, record in enumerate(read_split(continuous_cache, "train"))}
  assert len(index_of_latents) == NUM_TRAIN_CLIPS

  seen = []
  for process_index in range(2):
    loader = pipeline.make_train_loader(data, global_batch_size=4, seed=0,
                                        process_index=process_index, process_count=2)
    # 16 records, 8 per shard, 2 per process batch: four batches are one epoch of the shard.
    latents = np.concatenate([batch["latents"] for batch in take(iter(loader), 4)])
    seen.append({index_of_latents[latent.tobytes()] for latent in latents})

  assert len(seen[0]) == NUM_TRAIN_CLIPS // 2
  assert len(seen[1]) == NUM_TRAIN_CLIPS // 2
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(NUM_TRAIN_CLIPS))


def test_eval_batches_pad_with_mask(lfq_cache):
  data = cache_data(lfq_cache)

  batches = pipeline.eval_batches(data, source_name="token_cache", batch_size=3,
                                  max_batches=None)

  assert len(batches) == 3
  for batch in batches:
    assert set(batch) == {"tokens", "latents", "label", "clip_id", "mask"}
    chex.assert_shape(batch["tokens"], (3, *TOKEN_SHAPE))
    chex.assert_shape(batch["latents"], (3, *TOKEN_SHAPE, LATENT_BITS))
    chex.assert_shape([batch["label"], batch["clip_id"], batch["mask"]], [(3,)] * 3)
  assert batches[-1]["mask"].tolist() == [True, True, False]
  records = read_split(lfq_cache, "eval")
  real_ids = np.concatenate([batch["clip_id"][batch["mask"]] for batch in batches]).tolist()
  assert real_ids == [record["clip_id"] for record in records]
  np.testing.assert_array_equal(batches[0]["tokens"][1], records[1]["tokens"])


def test_eval_batches_max_batches(lfq_cache):
  batches = pipeline.eval_batches(cache_data(lfq_cache), source_name="token_cache",
                                  batch_size=2, max_batches=2)

  assert len(batches) == 2
  assert all(batch["mask"].all() for batch in batches)


# ---------------------------------------------------------------------------------------------
# Errors


def test_mismatching_tokenizer_rejected(lfq_cache, tokenizer):
  info = token_cache.read_cache_info(lfq_cache)
  token_cache.check_tokenizer(info, tokenizer)  # the matching tokenizer passes

  changed = nnx.clone(tokenizer)
  kernel = changed.encoder.conv_out.kernel
  kernel[...] = kernel[...] + 1e-3
  new_fingerprint = inference.tokenizer_fingerprint(changed)

  with pytest.raises(token_cache.TokenizerMismatchError) as raised:
    token_cache.check_tokenizer(info, changed)

  message = str(raised.value)
  assert new_fingerprint != info["tokenizer_fingerprint"]
  assert info["tokenizer_fingerprint"] in message
  assert new_fingerprint in message
  assert os.path.abspath(lfq_cache) in message
  assert "launch.tokenize" in message


def test_load_cache_tokenizer_matches(lfq_cache):
  info = token_cache.read_cache_info(lfq_cache)

  loaded, config = token_cache.load_cache_tokenizer(info)

  assert inference.tokenizer_fingerprint(loaded) == info["tokenizer_fingerprint"]
  assert config.model.latent_bits == LATENT_BITS


def test_missing_or_corrupt_cache_info(lfq_cache, tmp_path):
  copy = tmp_path / "cache"
  shutil.copytree(lfq_cache, copy)
  info_path = copy / token_cache.CACHE_INFO_NAME

  info_path.write_text("{\"format_version\": 1, ")
  with pytest.raises(token_cache.CacheError, match="corrupt"):
    token_cache.TokenCacheSource(copy, "train")

  info_path.write_text(json.dumps({"format_version": 1}))
  with pytest.raises(token_cache.CacheError, match="tokenizer_fingerprint"):
    token_cache.read_cache_info(copy)

  info_path.unlink()
  with pytest.raises(token_cache.CacheError, match="no cache_info.json") as raised:
    token_cache.read_cache_info(copy)
  assert "launch.tokenize" in str(raised.value)

  with pytest.raises(token_cache.CacheError, match="does not exist"):
    token_cache.read_cache_info(tmp_path / "absent")


def test_record_count_mismatch_rejected(lfq_cache, tmp_path):
  copy = tmp_path / "cache"
  shutil.copytree(lfq_cache, copy)
  info = json.loads((copy / token_cache.CACHE_INFO_NAME).read_text())
  info["num_clips"]["train"] += 1
  (copy / token_cache.CACHE_INFO_NAME).write_text(json.dumps(info))

  with pytest.raises(token_cache.CacheError, match="16 records"):
    token_cache.TokenCacheSource(copy, "train")


def test_validation_requires_cache_path(lfq_cache, tmp_path):
  config = magvit_configs.get_config("smoke")
  config.data.source = "token_cache"
  config.data.eval_sources = ("token_cache",)

  for path, reason in (("", "empty"), (str(tmp_path / "absent"), "does not exist"),
                       (str(tmp_path), "no cache_info.json")):
    config.data.token_cache.path = path
    with pytest.raises(ConfigError, match=reason):
      validation.validate_common(config, num_devices=8, num_processes=1)

  config.data.token_cache.path = lfq_cache
  validation.validate_common(config, num_devices=8, num_processes=1)


def test_tokenize_rejects_existing_output(lfq_cache, tokenizer_dir):
  result = subprocess.run(
      [sys.executable, "-m", "launch.tokenize", f"--workdir={tokenizer_dir}",
       f"--output={lfq_cache}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)

  assert result.returncode != 0
  assert "--overwrite" in result.stderr
  assert os.path.isfile(os.path.join(lfq_cache, token_cache.CACHE_INFO_NAME))
