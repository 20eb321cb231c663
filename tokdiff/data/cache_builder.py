"""Build a token cache: encode every clip of a dataset with a trained tokenizer.

`launch.tokenize` is the command; the comparison job calls `build_cache` directly. The data
settings (clip length, resolution, source options) come from the `data` section of the
tokenizer's saved config, so the clips match what the tokenizer was trained on. Both splits use
the deterministic evaluation clip (centred in time and space, no flip) of every record. The
cache layout is described in tokdiff/data/token_cache.py.
"""

import ast
import os
import shutil

from absl import app
from flax import nnx
import jax
import ml_collections
import numpy as np
import tqdm

from magvit import inference
from magvit import lfq
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import sharding as sharding_lib
from tokdiff import validation
from tokdiff.data import atari
from tokdiff.data import pipeline
from tokdiff.data import sources
from tokdiff.data import token_cache
from tokdiff.data import transforms

def resolve_data_config(saved_data: dict, dataset: str | None,
                        overrides: list[str]) -> ml_collections.ConfigDict:
  """Build the data config to encode: the tokenizer's, with the dataset and overrides applied."""
  data = ml_collections.ConfigDict(saved_data)
  data.lock()  # so that a mistyped override field raises instead of adding a new field
  if dataset:
    data.source = dataset
  for override in overrides:
    field, separator, text = override.partition("=")
    if not separator:
      raise app.UsageError(f"--data_override={override!r} is not FIELD=VALUE.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare word such as a path stays a string
    try:
      data.update_from_flattened_dict({field: value})
    except (AttributeError, KeyError) as error:
      raise app.UsageError(
          f"--data_override={override!r}: the tokenizer's data config has no field {field!r}. "
          "Use one of its fields, such as num_frames or video_folder.path.") from error
    except TypeError as error:
      raise app.UsageError(f"--data_override={override!r} has a value of the wrong type: "
                           f"{error}") from error
  if data.source not in pipeline.SOURCE_NAMES:
    raise app.UsageError(f"data.source={data.source!r} is not a video source; pass "
                         f"--dataset with one of {pipeline.SOURCE_NAMES}.")
  data.eval_sources = (data.source,)
  return data


def existing_cache_files(output: str, overwrite: bool) -> list[str]:
  """List the cache files already in `output`; raise UsageError if any exist without overwrite."""
  names = [token_cache.CACHE_INFO_NAME, *token_cache.SPLITS,
           *(f"{split}.unnormalized" for split in token_cache.SPLITS)]
  existing = [name for name in names if os.path.exists(os.path.join(output, name))]
  if existing and not overwrite:
    raise app.UsageError(f"--output={output} already contains a token cache "
                         f"({', '.join(existing)}). Pass --overwrite to replace it, or choose "
                         "another folder.")
  return existing


def prepare_output(output: str, existing: list[str]) -> None:
  """Create the output folder and delete the `existing` cache files in it."""
  # The info file goes first, so an interrupted rebuild never looks like a finished cache.
  for name in existing:
    path = os.path.join(output, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  os.makedirs(output, exist_ok=True)


def make_encoder(tokenizer, batch_size: int):
  """Jit the encoder with the batch split over every local device and the weights replicated.

  Returns:
    (encode, padded_batch_size): encode maps float32 clips (padded_batch_size, T, H, W, 3) to
    numpy dict `z` (B, t, h, w, K), `tokens` int32 (B, t, h, w) and `codes` (B, t, h, w, K).
  """
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  num_devices = sharding_lib.data_parallel_size(mesh)
  padded_batch_size = -(-batch_size // num_devices) * num_devices
  graphdef, state = nnx.split(tokenizer)
  state = jax.device_put(state, sharding_lib.replicated(mesh))

  def encode_fn(state, video):
    model = nnx.merge(graphdef, state)
    z = model.encode(video)
    _, ids, _ = model.quantize(z)
    return {"z": z, "tokens": ids, "codes": lfq.ids_to_bits(ids, model.latent_bits)}

  batch = sharding_lib.batch_sharding(mesh, 5)
  jitted = jax.jit(encode_fn, in_shardings=(sharding_lib.replicated(mesh), batch))

  def encode(video: np.ndarray) -> dict[str, np.ndarray]:
    return jax.device_get(jitted(state, video))

  return encode, padded_batch_size


def encoded_batches(source, spec: transforms.ClipSpec, encode, batch_size: int, desc: str):
  """Encode the evaluation clip of every readable record of `source`, in record order.

  Yields:
    (outputs, labels, clip_ids) per batch, where outputs contains `encode`'s arrays cut to the
    real clips. The last batch is padded with copies of its last clip before encoding.
  """
  clips, labels, clip_ids = [], [], []

  def flush():
    video = np.stack(clips + [clips[-1]] * (batch_size - len(clips)))
    outputs = {key: value[:len(clips)] for key, value in encode(video).items()}
    return outputs, np.asarray(labels, np.int32), list(clip_ids)

  for index in tqdm.tqdm(range(len(source)), desc=desc, unit="clip"):
    record = source[index]
    if record["video"] is None:
      continue  # the source already logged and counted the unreadable file
    clips.append(transforms.process_clip(record["video"], spec, None, record["clip_id"]))
    labels.append(int(record["label"]))
    clip_ids.append(record["clip_id"])
    if len(clips) == batch_size:
      yield flush()
      clips, labels, clip_ids = [], [], []
  if clips:
    yield flush()


def class_names_of(source) -> list[str] | None:
  """Return the label names a source defines, or None when it has none."""
  if isinstance(source, atari.AtariSource):
    return list(source.settings.games)
  if isinstance(source, sources.SampleVideoSource):
    return [path.stem for path in source.paths]
  if isinstance(source, sources.VideoFolderSource):
    return list(source.class_names)
  if isinstance(source, sources.TfdsSource) and source.label_key:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    features = tfds.data_source(source.name, split=source.split, data_dir=source.data_dir,
                                download=False).dataset_info.features
    # A ClassLabel feature has names, a plain integer Tensor feature does not.
    names = getattr(features[source.label_key], "names", None)
    return list(names) if names else None
  return None


def codebook_usage(token_counts: np.ndarray) -> dict[str, float]:
  """Return the fraction of token ids used and the perplexity of their histogram."""
  probs = token_counts[token_counts > 0] / token_counts.sum()
  return {"fraction_used": float(np.count_nonzero(token_counts) / token_counts.size),
          "perplexity": float(np.exp(-np.sum(probs * np.log(probs))))}


def write_split(output: str, split: str, source, spec, encode, batch_size: int,
                info: dict) -> set[int]:
  """Encode one split into `output/<split>` and record its clip count and codebook usage.

  Continuous latents are normalised with info's latent_stats. The train split of a continuous
  cache is first written with raw latents to a temporary folder and sets those statistics,
  because they are only known after the whole split is encoded.

  Returns:
    The labels seen in the split.
  """
  latent_kind = info["latent_kind"]
  needs_stats = latent_kind == "continuous" and split == "train"
  folder = os.path.join(output, f"{split}.unnormalized" if needs_stats else split)
  moments, labels_seen = None, set()
  # A histogram of 2^K counts is only kept for codebooks up to 2^20 ids (8 MiB).
  counts = np.zeros(info["codebook_size"], np.int64) if info["latent_bits"] <= 20 else None
  with token_cache.SplitWriter(folder) as writer:
    for outputs, labels, clip_ids in encoded_batches(source, spec, encode, batch_size, split):
      if latent_kind == "lfq":
        latents = outputs["codes"]
      elif needs_stats:
        if moments is None:
          moments = token_cache.RunningMoments(outputs["z"].shape[-1])
        moments.update(outputs["z"])
        latents = outputs["z"]
      else:
        latents = np.asarray(token_cache.normalize(outputs["z"], info))
      for index, clip_id in enumerate(clip_ids):
        writer.write(outputs["tokens"][index], latents[index], labels[index], clip_id)
      labels_seen.update(labels.tolist())
      if counts is not None:
        counts += np.bincount(outputs["tokens"].reshape(-1), minlength=counts.size)
      info["token_shape"] = list(outputs["tokens"].shape[1:])
  if not writer.num_records:
    raise ValueError(f"The {split} split of source {source!r} has no readable clips.")

  if needs_stats:
    info["latent_stats"] = moments.stats()
    _write_normalized(folder, os.path.join(output, split), info)
    shutil.rmtree(folder)
  info["num_clips"][split] = writer.num_records
  info["record_files"][split] = [token_cache.RECORD_FILE_NAME]
  if counts is not None:
    info["codebook_usage"][split] = codebook_usage(counts)
  return labels_seen


def _write_normalized(raw_folder: str, folder: str, info: dict) -> None:
  """Copy records from raw_folder to folder with their latents normalised."""
  raw = token_cache.read_split_records(os.path.join(raw_folder, token_cache.RECORD_FILE_NAME))
  with token_cache.SplitWriter(folder) as writer:
    for index in range(len(raw)):
      record = token_cache.deserialize_record(raw[index])
      latents = np.asarray(token_cache.normalize(record["latents"], info))
      writer.write(record["tokens"], latents, record["label"], record["clip_id"])


def build_cache(workdir: str, output: str, *, dataset: str | None, splits: list[str],
                latent_kind: str, batch_size: int, data_overrides: list[str],
                overwrite: bool) -> dict:
  """Encode the requested splits into `output` and write cache_info.json last.

  Returns:
    The cache info dict, as `token_cache.read_cache_info` reads it back (without `path`).
  """
  unknown = sorted(set(splits) - set(token_cache.SPLITS))
  if unknown or not splits:
    raise app.UsageError(f"--splits={','.join(splits)} must name some of {token_cache.SPLITS}.")
  if latent_kind == "continuous" and "train" not in splits:
    raise app.UsageError("--latent=continuous normalises with train-split statistics, so "
                         "--splits must include train.")
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise app.UsageError(f"--workdir={workdir} does not exist; pass a tokenizer training workdir.")
  existing = existing_cache_files(output, overwrite)

  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=1, use_async=False)
  step = checkpoints.latest_step()
  checkpoints.close()
  tokenizer, config = inference.load_tokenizer(workdir, step)
  data = resolve_data_config(config.data.to_dict(), dataset, data_overrides)
  validation.check_num_frames(data.num_frames, tokenizer.temporal_factor)
  prepare_output(output, existing)

  encode, padded_batch_size = make_encoder(tokenizer, batch_size)
  spec = pipeline.clip_spec(data, train=False)
  info = {
      "format_version": token_cache.FORMAT_VERSION,
      "tokenizer_workdir": workdir,
      "checkpoint_step": int(step),
      "tokenizer_fingerprint": inference.tokenizer_fingerprint(tokenizer),
      "latent_kind": latent_kind,
      "latent_stats": None,
      "latent_bits": tokenizer.latent_bits,
      "codebook_size": tokenizer.codebook_size,
      "temporal_factor": tokenizer.temporal_factor,
      "spatial_factor": tokenizer.spatial_factor,
      "num_frames": data.num_frames,
      "height": data.height,
      "width": data.width,
      "data_config": checkpoint_lib.config_to_dict(data),
      "num_clips": {},
      "record_files": {},
      "codebook_usage": {},
  }

  labels_seen, class_names = set(), None
  for split in [name for name in token_cache.SPLITS if name in splits]:
    source = pipeline.make_source(data, split)
    class_names = class_names or class_names_of(source)
    labels_seen |= write_split(output, split, source, spec, encode, padded_batch_size, info)

  info["labels_seen"] = sorted(labels_seen)
  info["class_names"] = class_names
  info["num_classes"] = max(len(class_names or ()), max(labels_seen) + 1)
  token_cache.write_cache_info(output, info)
  return info


def print_summary(info: dict, output: str, seconds: float) -> None:
  clips = ", ".join(f"{split} {count}" for split, count in info["num_clips"].items())
  usage = ", ".join(f"{split} {value['fraction_used']:.1%} (perplexity {value['perplexity']:.1f})"
                    for split, value in info["codebook_usage"].items()) or "not counted"
  print(f"Wrote token cache {os.path.abspath(output)} in {seconds:.1f} s:\n"
        f"  clips: {clips} from source {info['data_config']['source']!r}\n"
        f"  tokens (t, h, w) = {tuple(info['token_shape'])} from {info['num_frames']}x"
        f"{info['height']}x{info['width']} clips, {info['latent_bits']} bits per token\n"
        f"  latents: {info['latent_kind']}, classes: {info['num_classes']}\n"
        f"  codebook used: {usage}\n"
        f"  tokenizer: {info['tokenizer_workdir']} step {info['checkpoint_step']}, fingerprint "
        f"{info['tokenizer_fingerprint'][:16]}", flush=True)
