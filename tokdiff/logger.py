"""Metrics as JSON lines and TensorBoard events (tensorboardX, no TensorFlow), console progress.

Only the primary process (index 0) writes files; the others keep the same calls as no-ops, so the
trainer needs no process checks around logging.
"""

import io
import json
import os
import time

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter
from tensorboardX.proto import summary_pb2
import tqdm


def _gif_bytes(frames: np.ndarray, fps: int) -> bytes:
  images = [Image.fromarray(frame) for frame in frames]
  buffer = io.BytesIO()
  images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                 duration=int(1000 / fps), loop=0)
  return buffer.getvalue()


class MetricLogger:
  """Writes scalars to `metrics.jsonl` and TensorBoard, and animated GIFs to both disk and TB."""

  def __init__(self, workdir: str, *, is_primary: bool):
    self.workdir = workdir
    self.is_primary = is_primary
    self._tb = None
    if is_primary:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.is_primary:
      return
    values = {key: float(value) for key, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    for key, value in values.items():
      self._tb.add_scalar(key, value, step)

  def write_gif(self, step: int, tag: str, frames: np.ndarray, fps: int = 8) -> str | None:
    """Save uint8 frames (T, H, W, 3) as `samples/<tag>_<step>.gif`; return the path."""
    if not self.is_primary:
      return None
    data = _gif_bytes(frames, fps)
    path = os.path.join(self.workdir, "samples", f"{tag.replace('/', '_')}_{step:07d}.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)

    # TensorBoard's image dashboard plays GIF-encoded images as animations.
    height, width = frames.shape[1:3]
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=3,
                                      encoded_image_string=data)
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])
    self._tb.file_writer.add_summary(summary, step)
    return path

  def flush(self) -> None:
    if self.is_primary:
      self._tb.flush()

  def close(self) -> None:
    if self.is_primary:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """A progress bar plus one console line per logging interval with rate and ETA."""

  def __init__(self, start_step: int, num_steps: int, *, enabled: bool):
    self.num_steps = num_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._bar = tqdm.tqdm(total=num_steps, initial=start_step, disable=not enabled,
                          dynamic_ncols=True, unit="step")

  def advance(self, step: int) -> None:
    self._bar.update(step - self._bar.n)

  def interval_line(self, step: int, metrics: dict[str, float]) -> tuple[str, dict[str, float]]:
    """Format the console line for `step` and return it with the timing figures."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    step_time = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now

    timing = {"step_time_s": step_time, "steps_per_s": 1.0 / max(step_time, 1e-9)}
    eta = (self.num_steps - step) * step_time
    metrics_text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    line = (f"step {step}/{self.num_steps} {metrics_text} | {step_time:.3f} s/step, "
            f"{timing['steps_per_s']:.2f} steps/s, ETA {_format_seconds(eta)}")
    return line, timing

  def write(self, line: str) -> None:
    tqdm.tqdm.write(line)

  def close(self) -> None:
    self._bar.close()


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
