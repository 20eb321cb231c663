"""Load a trained tokenizer from a workdir and reconstruct videos with it."""

import hashlib

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magvit import model as model_lib
from magvit import task as task_lib
from tokdiff import checkpoint as checkpoint_lib
from tokdiff import metrics as metrics_lib
from tokdiff import trainer
from tokdiff.data import transforms

to_uint8 = task_lib.to_uint8


def load_tokenizer(workdir: str, step: int | None = None
                   ) -> tuple[model_lib.Tokenizer, ml_collections.ConfigDict]:
  """Return the tokenizer with the EMA parameters of `step` (default: latest) and its config."""
  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=1, use_async=False, create=False)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train a tokenizer "
                            "there first with `python -m launch.train`.")
  config = ml_collections.ConfigDict(checkpoints.saved_config(step))
  checkpoints.close()
  if config.model_family != "magvit":
    raise ValueError(f"{workdir} contains a {config.model_family!r} checkpoint, not a tokenizer "
                     "checkpoint; pass the workdir of a magvit run.")

  _, tokenizer, _ = trainer.load_ema_model(config, workdir, step)
  return tokenizer, config


def tokenizer_fingerprint(tokenizer: model_lib.Tokenizer) -> str:
  """Compute the sha256 hex digest of the tokenizer's parameters.

  The digest covers every nnx.Param's path, dtype, shape and bytes, in sorted path order, so the
  same checkpoint gives the same digest in every process and run.
  """
  digest = hashlib.sha256()
  flat = nnx.to_flat_state(nnx.state(tokenizer, nnx.Param))
  entries = sorted((("/".join(str(key) for key in path), variable) for path, variable in flat),
                   key=lambda entry: entry[0])
  for name, variable in entries:
    array = np.ascontiguousarray(jax.device_get(variable[...]))
    digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def prepare_video(frames: np.ndarray, *, height: int, width: int,
                  temporal_factor: int) -> np.ndarray:
  """Resize and centre-crop uint8 frames to height x width in [-1, 1], keeping 1+f*k of them."""
  num_frames = 1 + ((frames.shape[0] - 1) // temporal_factor) * temporal_factor
  clip = transforms.to_rgb(frames[:num_frames], "input video")
  clip = transforms.crop(transforms.resize_to_cover(clip, height, width), height, width, None)
  return transforms.to_model_range(clip)


def reconstruct(tokenizer: model_lib.Tokenizer, video: np.ndarray
                ) -> tuple[np.ndarray, dict[str, float]]:
  """Encode, quantize and decode one video (T, H, W, 3); return it with PSNR and SSIM."""
  batch = jnp.asarray(video)[None]
  recon, _ = tokenizer(batch)
  recon = jnp.clip(recon, -1.0, 1.0)
  scores = {"psnr": float(metrics_lib.psnr(recon, batch)[0]),
            "ssim": float(metrics_lib.ssim(recon, batch)[0])}
  return np.asarray(recon[0]), scores
