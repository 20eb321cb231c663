"""Encode and decode a video with the latest tokenizer checkpoint of a workdir.

  python -m launch.reconstruct --workdir=runs/demo_magvit --input=clip.mp4 --output=recon.mp4

The video is resized to the checkpoint's training resolution (or --height/--width) and cut to the
longest 1+4k frame prefix. The reconstruction is written as mp4, and its PSNR and SSIM printed.
"""

from absl import app
from absl import flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding tokenizer checkpoints.")
_INPUT = flags.DEFINE_string("input", None, "Video file to reconstruct (mp4, webm, avi, mkv, gif).")
_OUTPUT = flags.DEFINE_string("output", None, "Output mp4 path for the reconstruction.")
_HEIGHT = flags.DEFINE_integer("height", 0, "Frame height in pixels (0 = the training height).")
_WIDTH = flags.DEFINE_integer("width", 0, "Frame width in pixels (0 = the training width).")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 33, "Most frames to encode in one pass.")
_SIDE_BY_SIDE = flags.DEFINE_bool("side_by_side", False,
                                  "Write the input left and the reconstruction right.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()

  # Imported after the runtime set-up, which must run before JAX starts its backend.
  import numpy as np

  from magvit import inference
  from tokdiff import video_io

  tokenizer, config = inference.load_tokenizer(_WORKDIR.value)
  height = _HEIGHT.value or config.data.height
  width = _WIDTH.value or config.data.width

  frames = video_io.read_video(_INPUT.value, max_frames=_MAX_FRAMES.value)
  video = inference.prepare_video(frames, height=height, width=width,
                                  temporal_factor=tokenizer.temporal_factor)
  recon, scores = inference.reconstruct(tokenizer, video)

  output = np.concatenate([video, recon], axis=2) if _SIDE_BY_SIDE.value else recon
  # The output keeps the input's frame rate, rounded to whole frames per second.
  fps = max(1, round(video_io.read_fps(_INPUT.value)))
  video_io.write_mp4(_OUTPUT.value, inference.to_uint8(output), fps=fps)
  print(f"{video.shape[0]} frames at {height}x{width}: PSNR {scores['psnr']:.2f} dB, "
        f"SSIM {scores['ssim']:.4f}; wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
