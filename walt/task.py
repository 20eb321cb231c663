"""WALT's task for the shared trainer: the window attention diffusion transformer on a token cache.

The transformer's shapes come from the cache (latent grid, K channels, classes) and its sizes from
`config.model`. Training uses `diffusion_loss` on the cached latents (LFQ codes or normalised
continuous latents, as the cache was written), and evaluation samples with DDIM, maps the latents
to +-1 codes with `token_cache.latents_to_codes` and decodes them with the cache's tokenizer.
"""

from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from tokdiff import generation
from tokdiff.data import token_cache
from tokdiff.sharding import ConfigError
from walt import diffusion
from walt import sampling
from walt.model import WaltTransformer

LATENT_KINDS = ("lfq", "continuous")


class WaltTask(generation.GeneratorTask):
    """Class-conditional WALT over the latents of a token cache."""

    family = "walt"
    batch_fields = ("latents", "label")

    @property
    def sampling_steps(self) -> int:
        return int(self.config.sampling.num_steps)

    @property
    def noise_schedule(self) -> diffusion.NoiseSchedule:
        """The noise schedule of both the loss and the sampler."""
        return diffusion.NoiseSchedule(kind=self.config.diffusion.schedule,
                                       zero_terminal_snr=self.config.diffusion.zero_terminal_snr)

    @property
    def clip_x0(self) -> float | None:
        """Bound of the sampler's x0 estimates: 1 for LFQ codes when enabled, else None."""
        if self.cache_info["latent_kind"] == "lfq" and self.config.sampling.clip_lfq_x0:
            return 1.0
        return None

    def validate_model(self, info: dict[str, Any]) -> None:
        model = self.config.model
        if info["latent_kind"] not in LATENT_KINDS:
            raise ConfigError(
                f"the token cache has latent_kind={info['latent_kind']!r}, which WALT cannot "
                f"train on. Rebuild it with `launch.tokenize --latent=` one of {LATENT_KINDS}.")
        if self.config.diffusion.schedule not in diffusion.SCHEDULE_KINDS:
            raise ConfigError(f"diffusion.schedule={self.config.diffusion.schedule!r} is unknown. "
                              f"Use one of {diffusion.SCHEDULE_KINDS}.")
        generation.check_probabilities(self.config, ("loss.label_dropout", "loss.self_cond_prob"))

        _, height, width = self.token_shape
        if model.patch_size < 1 or height % model.patch_size or width % model.patch_size:
            raise ConfigError(
                f"model.patch_size={model.patch_size} does not divide the cache's latent size "
                f"{height}x{width}. Use a positive divisor of both.")
        _check_window("model.spatial_window", model.spatial_window, lengths=(0, 2),
                      expected="() for whole frames or (wh, ww)")
        _check_window("model.spatiotemporal_window", model.spatiotemporal_window, lengths=(3,),
                      expected="(wt, wh, ww)")

    def build_model(self, rngs: nnx.Rngs) -> WaltTransformer:
        model = self.config.model
        return WaltTransformer(
            latent_channels=int(self.cache_info["latent_bits"]),
            latent_shape=self.token_shape,
            patch_size=model.patch_size,
            embed_dim=model.embed_dim,
            depth=model.depth,
            num_heads=model.num_heads,
            mlp_dim=model.mlp_dim,
            # An empty spatial window means whole frames.
            spatial_window=tuple(model.spatial_window) or None,
            spatiotemporal_window=tuple(model.spatiotemporal_window),
            num_classes=int(self.cache_info["num_classes"]),
            self_condition=model.self_condition,
            qk_norm=model.qk_norm,
            rngs=rngs)

    def model_loss(self, model, batch, rng, *, train):
        loss = self.config.loss
        return diffusion.diffusion_loss(
            model, batch, rng,
            schedule=self.noise_schedule,
            self_cond_prob=loss.self_cond_prob,
            label_dropout=loss.label_dropout if train else 0.0)

    def sample_outputs(self, model, labels, rng):
        sampler = self.config.sampling
        shape = self.token_shape + (int(self.cache_info["latent_bits"]),)
        return sampling.sample(
            model, labels=labels, shape=shape, num_steps=sampler.num_steps, rng=rng,
            guidance_scale=sampler.guidance_scale, schedule=self.noise_schedule,
            clip_x0=self.clip_x0)

    def outputs_to_codes(self, outputs: np.ndarray) -> np.ndarray:
        """Map generated latents (N, t, h, w, K) to the +-1 codes the tokenizer decodes."""
        return np.asarray(token_cache.latents_to_codes(outputs, self.cache_info))


def _check_window(field: str, window, *, lengths: tuple[int, ...], expected: str) -> None:
    window = tuple(window)
    if len(window) not in lengths or any(size < 1 for size in window):
        raise ConfigError(f"{field}={window} is invalid. Use {expected} in tokens, each size at "
                          "least 1.")


def make_task(config: ml_collections.ConfigDict, **kwargs) -> WaltTask:
    """Build the WALT task; `kwargs` go to `GeneratorTask.__init__` (cache_info, tokenizer)."""
    return WaltTask(config, **kwargs)
