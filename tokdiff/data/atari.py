"""Atari gameplay clips rendered offline with ale-py and a seeded random policy.

ale-py ships its ROMs, so rendering needs no download. All clips of a split are rendered when
the source is built and kept in memory. An optional cache folder stores them as .npz files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import tempfile
import time

import ale_py
import gymnasium
import numpy as np

from tokdiff.data import transforms

DEFAULT_GAMES = (
    "Pong",
    "Breakout",
    "SpaceInvaders",
    "MsPacman",
    "Seaquest",
    "Enduro",
    "Freeway",
    "Boxing",
)

# Bump when the rendering procedure changes, so stale cache files are not reused.
_CACHE_FORMAT_VERSION = 1

# Upper bound on the steps spent looking for the end of a game's attract mode.
_MAX_ATTRACT_STEPS = 1000

# Game overs allowed while one clip is recorded before rendering fails.
_MAX_RECORDING_RESTARTS = 10

# Each worker process takes a few seconds to start (it imports numpy, ale-py and tokdiff),
# which small splits do not win back. This threshold is a rough estimate.
_MIN_CLIPS_PER_WORKER = 32


@dataclasses.dataclass(frozen=True)
class AtariClipSettings:
  """Everything that determines the rendered clips of one split.

  Attributes:
    games: ALE game names (as in "ALE/<game>-v5"). Clip i shows games[i % len(games)], and its
      label is that index.
    num_clips: number of clips in the split.
    seed: split seed. Clip i uses seed + i for its policy and warm-up length.
    clip_length: recorded frames per clip.
    frame_skip: emulator frames between two recorded frames (the ALE `frameskip`).
    max_warmup_steps: each clip first plays a seeded random number of steps in [0, this].
    cover_size: optional (height, width). Frames are resized to the smallest size with the
      210x160 aspect ratio that covers it, which keeps the split small in memory.
  """

  games: tuple[str, ...]
  num_clips: int
  seed: int
  clip_length: int
  frame_skip: int
  max_warmup_steps: int
  cover_size: tuple[int, int] | None = None

  def __post_init__(self):
    if not self.games:
      raise ValueError("AtariClipSettings.games is empty. Name at least one ALE game, e.g. 'Pong'.")
    if self.num_clips < 1 or self.clip_length < 1 or self.frame_skip < 1:
      raise ValueError(
          "num_clips, clip_length and frame_skip must be at least 1, got "
          f"{self.num_clips}, {self.clip_length} and {self.frame_skip}."
      )
    if self.max_warmup_steps < 0:
      raise ValueError(f"max_warmup_steps must be >= 0, got {self.max_warmup_steps}.")

  @property
  def clip_seeds(self) -> range:
    """Seeds of the clips of this split, one per clip."""
    return range(self.seed, self.seed + self.num_clips)

  def cache_key(self) -> str:
    """Hash of every setting that affects the rendered pixels, plus the ale-py version."""
    fields = dataclasses.asdict(self)
    fields["ale_py"] = ale_py.__version__
    fields["format"] = _CACHE_FORMAT_VERSION
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_disjoint_seeds(train: AtariClipSettings, evaluation: AtariClipSettings) -> None:
  """Raise ValueError if any training clip seed is also an evaluation clip seed."""
  overlap = set(train.clip_seeds) & set(evaluation.clip_seeds)
  if overlap:
    raise ValueError(
        f"Atari train clip seeds {train.clip_seeds} and eval clip seeds {evaluation.clip_seeds} "
        f"overlap ({len(overlap)} shared seeds), so evaluation clips would repeat training clips. "
        f"Set data.atari.eval_seed >= train_seed + num_train_clips "
        f"(= {train.seed + train.num_clips}) or eval_seed <= train_seed - num_eval_clips "
        f"(= {train.seed - evaluation.num_clips})."
    )


def _make_environment(game: str, frame_skip: int):
  """Create the unwrapped ALE environment of one game (RGB observations, sticky actions)."""
  gymnasium.register_envs(ale_py)
  try:
    environment = gymnasium.make(f"ALE/{game}-v5", render_mode=None, frameskip=frame_skip)
  except gymnasium.error.Error as error:
    raise ValueError(
        f"Cannot create the Atari game {game!r} ({error}). Use an ALE game name such as "
        f"{DEFAULT_GAMES[0]!r}. ale-py lists them with `ale_py.roms.get_all_rom_ids()`."
    ) from error

  # gymnasium's wrappers (OrderEnforcing, PassiveEnvChecker) track episode state that the
  # emulator state restores in this module bypass, so the raw AtariEnv is used.
  return environment.unwrapped


def _resize_frame(frame: np.ndarray, cover_size: tuple[int, int] | None) -> np.ndarray:
  if cover_size is None:
    return frame
  return transforms.resize_to_cover(frame[None], *cover_size)[0]


def _skip_attract_mode(environment, max_steps: int = _MAX_ATTRACT_STEPS):
  """Play until the screen starts to depend on the actions and return the state there.

  Some games start with an intro that ignores the joystick (with ale-py 0.12.1 and a frame
  skip of 4: about 31 steps in Seaquest, 32 in SpaceInvaders, 66 in MsPacman). Clips that start inside it would be
  identical whenever their warm-up lengths match, even across splits. Two branches with
  different actions run side by side until their screens differ. The state just before that
  step is returned, so the clip's own actions matter from its first step.
  """
  ale = environment.ale
  num_actions = environment.action_space.n
  # A fixed generator: the skipped part must not depend on the split or clip.
  rng = np.random.default_rng(0)
  branches = [ale.cloneState(include_rng=True)] * 2

  for _ in range(max_steps):
    action_a = int(rng.integers(num_actions))
    action_b = (action_a + 1 + int(rng.integers(max(num_actions - 1, 1)))) % num_actions
    screens = []
    next_branches = []
    for state, action in zip(branches, (action_a, action_b)):
      ale.restoreState(state)
      screens.append(environment.step(action)[0])
      next_branches.append(ale.cloneState(include_rng=True))
    if not np.array_equal(screens[0], screens[1]):
      return branches[0]
    branches = next_branches

  # NOTE: a game whose screen never reacts within max_steps starts from this later state.
  return branches[0]


def _render_clip(environment, start_state, rng: np.random.Generator, settings) -> np.ndarray:
  """Play a warm-up, then record `clip_length` observations with a uniform random policy.

  A game over restores `start_state`. During the recording it also discards the frames
  recorded so far, so a clip never contains a cut back to the start of the game.
  """
  ale = environment.ale
  ale.restoreState(start_state)
  num_actions = environment.action_space.n

  def step() -> tuple[np.ndarray, bool]:
    observation, _, terminated, truncated, _ = environment.step(int(rng.integers(num_actions)))
    if terminated or truncated:
      ale.restoreState(start_state)
    return observation, terminated or truncated

  # The first recorded frame comes after a step because the emulator's screen buffer is not
  # part of the restored state, so before a step it still shows the previous clip.
  for _ in range(int(rng.integers(0, settings.max_warmup_steps + 1))):
    step()

  frames = []
  restarts = 0
  while len(frames) < settings.clip_length:
    observation, game_over = step()
    if not game_over:
      frames.append(_resize_frame(observation, settings.cover_size))
      continue
    frames = []
    restarts += 1
    if restarts > _MAX_RECORDING_RESTARTS:
      raise RuntimeError(
          f"Random play lost the game {_MAX_RECORDING_RESTARTS} times before recording "
          f"{settings.clip_length} frames. Lower data.num_frames or data.atari.frame_skip."
      )
  return np.stack(frames)


def _render_game_clips(settings: AtariClipSettings, game_index: int) -> list[np.ndarray]:
  """Render the clips i with i % len(games) == game_index, in order of i."""
  environment = _make_environment(settings.games[game_index], settings.frame_skip)
  environment.reset(seed=settings.seed)
  start_state = _skip_attract_mode(environment)

  clip_seeds = settings.clip_seeds[game_index :: len(settings.games)]
  videos = [
      _render_clip(environment, start_state, np.random.default_rng(seed), settings)
      for seed in clip_seeds
  ]
  environment.close()
  return videos


def render_clips(
    settings: AtariClipSettings, num_workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Render every clip of one split, one game per worker process.

  Each game's environment is reset once with `settings.seed`, played past its attract mode
  (see `_skip_attract_mode`), and that start state (with the emulator's random generator) is
  saved. Clip i restores it and draws its warm-up length and actions from
  `np.random.default_rng(settings.seed + i)`. Restoring a saved state takes microseconds,
  while re-seeding the ALE reloads the ROM (about 90 ms on a 2-core x86 CPU with ale-py
  0.12.1), so per-clip randomness comes from the policy and the warm-up. Clips therefore do
  not depend on the order or the process they are rendered in.

  Args:
    settings: what to render.
    num_workers: worker processes. None uses one per game up to the CPU count when there are
      at least _MIN_CLIPS_PER_WORKER clips per game, and renders in this process otherwise.
      Workers use the spawn start method, so the calling script needs the usual
      `if __name__ == "__main__":` guard.

  Returns:
    (videos, labels): uint8 (num_clips, clip_length, H, W, 3) and int32 (num_clips,).
  """
  num_games = len(settings.games)
  if num_workers is None:
    enough_clips = settings.num_clips >= _MIN_CLIPS_PER_WORKER * num_games
    num_workers = min(num_games, os.cpu_count() or 1) if enough_clips else 1

  if num_workers > 1:
    # spawn, because forking a process that has started JAX or grain threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      per_game = list(pool.map(_render_game_clips, [settings] * num_games, range(num_games)))
  else:
    per_game = [_render_game_clips(settings, game_index) for game_index in range(num_games)]

  # Interleave back into clip order: clip i is clip i // num_games of game i % num_games.
  videos = [per_game[index % num_games][index // num_games] for index in range(settings.num_clips)]
  labels = np.arange(settings.num_clips, dtype=np.int32) % num_games
  return np.stack(videos), labels


def load_or_render_clips(
    settings: AtariClipSettings, cache_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
  """Return the rendered clips, reading or writing `<cache_dir>/atari-<key>.npz` when given."""
  cache_path = None
  if cache_dir:
    cache_path = pathlib.Path(cache_dir) / f"atari-{settings.cache_key()}.npz"
    if cache_path.is_file():
      with np.load(cache_path) as cached:
        return cached["videos"], cached["labels"]

  start = time.perf_counter()
  videos, labels = render_clips(settings)
  logging.info(
      "Rendered %d Atari clips of %d frames from %d games in %.1f s.",
      settings.num_clips,
      settings.clip_length,
      len(settings.games),
      time.perf_counter() - start,
  )

  if cache_path is not None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename it, so a concurrent reader never sees half a file.
    with tempfile.NamedTemporaryFile(dir=cache_path.parent, suffix=".npz", delete=False) as file:
      np.savez(file, videos=videos, labels=labels)
    os.replace(file.name, cache_path)
  return videos, labels


class AtariSource:
  """Random-access source of pre-rendered Atari clips (grain RandomAccessDataSource style).

  Records are dicts with `video` uint8 (clip_length, H, W, 3), `label` int (the game index)
  and `clip_id` str. The same settings always give byte-identical clips.
  """

  def __init__(self, settings: AtariClipSettings, cache_dir: str | os.PathLike | None = None):
    self.settings = settings
    self._videos, self._labels = load_or_render_clips(settings, cache_dir)

  def __len__(self) -> int:
    return len(self._videos)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    game = self.settings.games[int(self._labels[index])]
    return {
        "video": self._videos[index],
        "label": int(self._labels[index]),
        "clip_id": f"atari/{game}/seed{self.settings.seed + index}",
    }

  def __repr__(self) -> str:
    # grain compares this text when restoring an iterator state, so it must be stable.
    return f"AtariSource(settings={self.settings})"
