"""The tokenizer's task for the shared trainer: model from config fields, loss and evaluation."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from magvit import losses
from magvit import model as model_lib
from tokdiff import metrics as metrics_lib
from tokdiff import sharding as sharding_lib
from tokdiff import task as task_lib
from tokdiff import validation
from tokdiff import video_io
from tokdiff.sharding import ConfigError


def build_tokenizer(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> model_lib.Tokenizer:
  """Build the tokenizer from the config's `model` section (also used by the launch scripts)."""
  m = model_config
  return model_lib.Tokenizer(
      in_channels=3,
      base_channels=m.base_channels,
      channel_multipliers=tuple(m.channel_multipliers),
      num_res_blocks=m.num_res_blocks,
      temporal_downsample=tuple(m.temporal_downsample),
      spatial_downsample=tuple(m.spatial_downsample),
      latent_bits=m.latent_bits,
      num_groups=m.num_groups,
      entropy_temperature=m.entropy_temperature,
      exact_entropy_max_bits=m.entropy_exact_max_bits,
      rngs=rngs)


def to_uint8(video: np.ndarray) -> np.ndarray:
  """Map [-1, 1] floats to uint8 pixels."""
  return np.clip(np.round((np.asarray(video) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class TokenizerTask:
  """Reconstruction training of the MAGVIT-v2-style tokenizer."""
  config: ml_collections.ConfigDict

  def validate(self) -> None:
    m, data = self.config.model, self.config.data
    if len(m.temporal_downsample) != len(m.channel_multipliers) or (
        len(m.spatial_downsample) != len(m.channel_multipliers)):
      raise ConfigError(
          f"model.temporal_downsample={tuple(m.temporal_downsample)} and "
          f"model.spatial_downsample={tuple(m.spatial_downsample)} need one flag per stage of "
          f"model.channel_multipliers={tuple(m.channel_multipliers)}.")
    temporal_factor = 2 ** sum(bool(t) for t in m.temporal_downsample)
    spatial_factor = 2 ** sum(bool(s) for s in m.spatial_downsample)
    validation.check_num_frames(data.num_frames, temporal_factor)
    for field in ("height", "width"):
      size = data[field]
      if size % spatial_factor:
        raise ConfigError(f"data.{field}={size} is not divisible by the tokenizer's spatial "
                          f"factor {spatial_factor}; use {max(spatial_factor, size - size % spatial_factor)}.")
    if self.config.loss.recon_loss not in ("l1", "l2"):
      raise ConfigError(f"loss.recon_loss={self.config.loss.recon_loss!r}; use 'l1' or 'l2'.")
    if self.config.loss.perceptual_weight or self.config.loss.gan_weight:
      raise ConfigError("loss.perceptual_weight and loss.gan_weight must be 0: the perceptual "
                        "and GAN losses are not implemented yet.")

  def build_model(self, rngs: nnx.Rngs) -> model_lib.Tokenizer:
    return build_tokenizer(self.config.model, rngs)

  def loss_fn(self, model, batch, rng):
    del rng  # the tokenizer is deterministic
    video = batch["video"]
    recon, aux = model(video)
    loss_config = self.config.loss
    return losses.tokenizer_loss(
        recon, video, aux,
        recon_loss=loss_config.recon_loss,
        recon_weight=loss_config.recon_weight,
        entropy_weight=loss_config.entropy_weight,
        commitment_weight=loss_config.commitment_weight,
        perceptual_weight=loss_config.perceptual_weight,
        gan_weight=loss_config.gan_weight)

  def evaluate(self, model, context: task_lib.EvalContext) -> dict[str, float]:
    graphdef, state = nnx.split(model)
    reconstruct = jax.jit(_reconstruct_fn(graphdef))
    results = {}
    for source, batches in context.eval_batches.items():
      results.update(self._evaluate_source(reconstruct, state, source, batches, context))
    return results

  def _evaluate_source(self, reconstruct, state, source, batches, context) -> dict[str, float]:
    psnr, ssim, ids, grid_rows = [], [], [], None
    for batch in batches:
      video = sharding_lib.host_to_global(batch["video"], context.mesh)
      outputs = multihost_utils.process_allgather(reconstruct(state, video), tiled=True)
      keep = np.asarray(batch["mask"], bool)
      psnr.append(outputs["psnr"][keep])
      ssim.append(outputs["ssim"][keep])
      ids.append(outputs["ids"][keep])
      if grid_rows is None:
        num_shown = self.config.eval.num_visualized
        grid_rows = [to_uint8(batch["video"][:num_shown]), to_uint8(outputs["recon"][:num_shown])]

    usage = metrics_lib.codebook_usage(np.concatenate(ids), 2 ** self.config.model.latent_bits)
    path = context.writer.write_gif(context.step, f"recon/{source}",
                                    video_io.stack_rows(grid_rows), fps=self.config.eval.gif_fps)
    if path:
      print(f"reconstructions ({source}, real above, reconstruction below): {path}", flush=True)
    return {
        f"{source}/psnr": float(np.mean(np.concatenate(psnr))),
        f"{source}/ssim": float(np.mean(np.concatenate(ssim))),
        f"{source}/codebook_fraction_used": float(usage["fraction_used"]),
        f"{source}/codebook_perplexity": float(usage["perplexity"]),
    }


def _reconstruct_fn(graphdef):
  def reconstruct(state, video):
    model = nnx.merge(graphdef, state)
    recon, aux = model(video)
    recon = jnp.clip(recon, -1.0, 1.0)
    return {"recon": recon, "ids": aux["ids"],
            "psnr": metrics_lib.psnr(recon, video), "ssim": metrics_lib.ssim(recon, video)}
  return reconstruct


def make_task(config: ml_collections.ConfigDict) -> TokenizerTask:
  return TokenizerTask(config)
