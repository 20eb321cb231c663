"""Encode every clip of a dataset with a trained tokenizer into a token cache.

  python -m launch.tokenize --workdir=runs/magvit_tiny --output=runs/tokens_tiny \
      [--dataset=atari|sample_videos|video_folder|tfds] [--splits=train,eval] \
      [--latent=lfq|continuous] [--batch_size=16] [--data_override=video_folder.path=/videos]

The data settings (clip length, resolution, source options) come from the `data` section of the
tokenizer's saved config, so the clips match what the tokenizer was trained on. Both splits use
the deterministic evaluation clip (centred in time and space, no flip) of every record. Train
MaskGIT or WALT on the result with `--config.data.token_cache.path=OUTPUT`. The cache layout is
described in tokdiff/data/token_cache.py.
"""

import time

from absl import app
from absl import flags
import jax

from launch import common
from tokdiff.data import pipeline
from tokdiff.data import token_cache
from tokdiff.data.cache_builder import build_cache, print_summary

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the tokenizer; its latest "
                               "checkpoint is used.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the token cache to.")
_DATASET = flags.DEFINE_enum("dataset", None, list(pipeline.SOURCE_NAMES),
                             "Video source to encode, for both splits (default: the tokenizer "
                             "config's data.source).")
_SPLITS = flags.DEFINE_list("splits", ["train", "eval"], "Splits to encode.")
_LATENT = flags.DEFINE_enum("latent", "lfq", list(token_cache.LATENT_KINDS),
                            "Latents stored for diffusion: 'lfq' stores the +-1 codes, "
                            "'continuous' the encoder outputs normalised per channel with "
                            "train-split statistics.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Clips per encoder call, rounded up to a "
                                   "multiple of the device count.")
_DATA_OVERRIDE = flags.DEFINE_multi_string(
    "data_override", [], "FIELD=VALUE setting a field of the data config, e.g. "
    "video_folder.path=/data/videos. Repeat the flag for several fields.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing cache in --output.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  # NOTE: one process encodes everything; a multi-process job would write each split once per
  # process, so it is rejected rather than sharded.
  if jax.process_count() > 1:
    raise app.UsageError(f"launch.tokenize runs in one process, but this job has "
                         f"{jax.process_count()}. Run it without JAX_COORDINATOR_ADDRESS.")

  start = time.perf_counter()
  info = build_cache(_WORKDIR.value, _OUTPUT.value, dataset=_DATASET.value,
                     splits=_SPLITS.value, latent_kind=_LATENT.value,
                     batch_size=_BATCH_SIZE.value, data_overrides=_DATA_OVERRIDE.value,
                     overwrite=_OVERWRITE.value)
  print_summary(info, _OUTPUT.value, time.perf_counter() - start)


if __name__ == "__main__":
  app.run(main)
