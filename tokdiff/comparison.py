"""The tokenizer-versus-diffusion comparison job.

Trains (or reuses) the tokenizer, encodes one token cache, trains MaskGIT and WALT on it with the
same batch, steps and mesh, then samples both, measures FVD against held-out real clips, and
writes the report. Every stage resumes: rerunning the same command reuses finished work.
"""

import os
import statistics
import time

import jax
import ml_collections
import numpy as np

from magvit import inference
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import fvd as fvd_lib
from tokdiff import generation
from tokdiff import report as report_lib
from tokdiff import trainer
from tokdiff import video_io
from tokdiff.data import cache_builder
from tokdiff.data import pipeline
from tokdiff.data import token_cache

GENERATORS = ("maskgit", "walt")


def generator_config(config: ml_collections.ConfigDict, name: str,
                     cache_dir: str) -> ml_collections.ConfigDict:
  """Return the generator's config with the shared cache, batch size and step count."""
  gen = ml_collections.ConfigDict(config[name].to_dict())
  gen.data.token_cache.path = cache_dir
  gen.train.num_steps = config.generator_steps
  gen.train.batch_size = config.generator_batch_size
  gen.mesh = ml_collections.ConfigDict(config.tokenizer.mesh.to_dict())
  gen.seed = config.seed
  gen.lock()
  return gen


def ensure_cache(tokenizer_dir: str, cache_dir: str, latent: str) -> dict:
  """Reuse the cache if the latest tokenizer checkpoint wrote it, else (re)build it."""
  checkpoints = checkpoint_lib.Checkpointer(tokenizer_dir, keep=1, use_async=False)
  step = checkpoints.latest_step()
  checkpoints.close()
  try:
    info = token_cache.read_cache_info(cache_dir)
    if info["checkpoint_step"] == step and info["latent_kind"] == latent:
      print(f"Reusing the token cache in {cache_dir} (tokenizer step {step}).", flush=True)
      return info
  except token_cache.CacheError:
    pass
  cache_builder.build_cache(tokenizer_dir, cache_dir, dataset=None, splits=["train", "eval"],
                       latent_kind=latent, batch_size=16, data_overrides=[], overwrite=True)
  return token_cache.read_cache_info(cache_dir)


def real_clips(tokenizer_config: ml_collections.ConfigDict,
               num_videos: int) -> tuple[np.ndarray, np.ndarray]:
  """Return held-out clips of the tokenizer's training source, uint8 (N, T, H, W, 3), and labels."""
  data = tokenizer_config.data
  batches = pipeline.eval_batches(data, source_name=data.source, batch_size=num_videos,
                                  max_batches=1)
  batch = batches[0]
  clips = batch["video"][np.asarray(batch["mask"], bool)]
  if len(clips) < num_videos:
    raise ValueError(f"the eval split of {data.source!r} has {len(clips)} clips but "
                     f"num_videos={num_videos}; raise its clip count (e.g. "
                     "tokenizer.data.atari.num_eval_clips) or lower num_videos.")
  return inference.to_uint8(clips), batch["label"][:num_videos]


def reconstruct_clips(tokenizer, clips: np.ndarray, batch_size: int) -> np.ndarray:
  """Tokenizer reconstructions of uint8 clips: the floor any generator's FVD is measured from."""
  recon = jax.jit(lambda video: tokenizer(video)[0])
  outputs = []
  for start in range(0, len(clips), batch_size):
    video = clips[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
    outputs.append(inference.to_uint8(np.asarray(recon(video))))
  return np.concatenate(outputs)


def random_token_videos(tokenizer, info: dict, num_videos: int, seed: int) -> np.ndarray:
  """Videos decoded from uniformly random token ids: the trivial baseline."""
  shape = (num_videos, *info["token_shape"])
  ids = np.random.default_rng(seed).integers(0, 2 ** info["latent_bits"], shape)
  videos = jax.jit(tokenizer.decode_ids)(ids.astype(np.int32))
  return inference.to_uint8(np.asarray(videos))


def measure_generator(config, workdir: str, labels: np.ndarray) -> dict:
  """Sample one video per label and collect the figures of the report's table."""
  task, model, num_params = trainer.load_ema_model(config, workdir)
  rng = jax.random.key(config.seed + 1)
  task.generate(model, labels, rng)  # compile outside the timed run

  start = time.perf_counter()
  videos = task.generate(model, labels, rng)
  seconds = time.perf_counter() - start

  step_times = [r["step_time_s"] for r in report_lib.read_metrics(workdir) if "step_time_s" in r]
  return {
      "videos": videos,
      "parameters": num_params,
      "flops_per_step": trainer.step_flops(config),
      "train_step_s": statistics.median(step_times) if step_times else float("nan"),
      "sampling_s_per_video": seconds / len(labels),
      "sampling_steps": task.sampling_steps,
  }


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run every stage in `workdir` and write report.md and report.html; return the table rows."""
  workdir = os.path.abspath(workdir)
  started = time.perf_counter()
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  trainer.train_and_evaluate(config.tokenizer, tokenizer_dir)
  info = ensure_cache(tokenizer_dir, os.path.join(workdir, "cache"), config.latent)

  generator_configs = {name: generator_config(config, name, info["path"]) for name in GENERATORS}
  for name, gen_config in generator_configs.items():
    print(f"--- training {name} ---", flush=True)
    trainer.train_and_evaluate(gen_config, os.path.join(workdir, name))

  print("--- sampling and FVD ---", flush=True)
  real, labels = real_clips(config.tokenizer, config.num_videos)
  tokenizer, _ = token_cache.load_cache_tokenizer(info)
  sets = {"real": real,
          "tokenizer reconstruction": reconstruct_clips(tokenizer, real, config.fvd_batch_size),
          "random tokens": random_token_videos(tokenizer, info, config.num_videos, config.seed)}
  rows = {}
  for name, gen_config in generator_configs.items():
    rows[name] = measure_generator(gen_config, os.path.join(workdir, name), labels)
    sets[name] = rows[name].pop("videos")

  # The real clips are embedded once and shared by every FVD estimate.
  real_stats = fvd_lib.feature_stats(fvd_lib.embed_videos(real, config.fvd_batch_size))
  for name, videos in sets.items():
    if name != "real":
      fake_stats = fvd_lib.feature_stats(fvd_lib.embed_videos(videos, config.fvd_batch_size))
      rows.setdefault(name, {})["fvd"] = fvd_lib.frechet_distance(*real_stats, *fake_stats)
      print(f"FVD {name}: {rows[name]['fvd']:.1f}", flush=True)
  return _write(config, workdir, rows, sets, time.perf_counter() - started)


def _write(config, workdir: str, rows: dict, sets: dict, seconds: float) -> dict:
  figures = {"Training loss": report_lib.plot_loss_curves(
      {name: os.path.join(workdir, name) for name in GENERATORS},
      os.path.join(workdir, "loss_curves.png"))}
  for name, videos in sets.items():
    path = os.path.join(workdir, "samples", f"{name.replace(' ', '_')}.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    video_io.write_gif(path, generation.sample_grid(videos[:16]), fps=config.tokenizer.eval.gif_fps)
    figures[f"Samples: {name}"] = path

  columns = ["model", "fvd", "parameters", "flops_per_step", "train_step_s",
             "sampling_s_per_video", "sampling_steps"]
  table = [{"model": name, **values} for name, values in rows.items()]
  notes = [
      f"FVD: Kinetics-400 I3D features of {config.num_videos} generated videos against "
      f"{config.num_videos} held-out real clips of the tokenizer's training source. Small "
      "sets make FVD noisy and biased upwards; compare values within one report.",
      "tokenizer reconstruction: the real clips encoded and decoded (rFVD). With enough "
      "videos it bounds what a generator decoded by this tokenizer can reach; below it, the "
      "differences are within FVD's sampling noise. random tokens: uniformly random token ids "
      "decoded, the trivial baseline.",
      "Both generators trained on the same token cache with the same batch size, step count "
      "and mesh. flops_per_step is XLA's cost analysis of the compiled train step; "
      "train_step_s is the median logged step time; sampling time includes decoding.",
      f"This run of the command: {seconds / 60:.1f} min on {jax.device_count()} "
      f"{jax.default_backend()} device(s), not counting stages reused from earlier runs.",
  ]
  md_path, html_path = report_lib.write_report(
      workdir, title="Masked tokens versus latent diffusion",
      summary="Class-conditional video generation on one tokenizer's cached output.",
      columns=columns, rows=table, figures=figures, notes=notes, config=config.to_dict())
  print(f"Report: {md_path} and {html_path}", flush=True)
  print(report_lib.markdown_table(columns, table), flush=True)
  return rows
