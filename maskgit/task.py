"""MaskGIT's task for the shared trainer: the masked token transformer on a token cache.

The transformer's shapes come from the cache (token grid, bits K, classes) and its sizes from
`config.model`. Training uses `masked_token_loss` on the cached token ids, and evaluation samples
with iterative parallel decoding and decodes the tokens with the cache's tokenizer.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from magvit import lfq
from maskgit import losses
from maskgit import sampling
from maskgit import schedule as mask_schedule
from maskgit.model import MaskGitTransformer
from tokdiff import generation
from tokdiff.sharding import ConfigError


class MaskGitTask(generation.GeneratorTask):
    """Class-conditional MaskGIT over the token ids of a token cache."""

    family = "maskgit"
    batch_fields = ("tokens", "label")

    @property
    def sampling_steps(self) -> int:
        return int(self.config.sampling.num_steps)

    @property
    def seq_len(self) -> int:
        """Tokens per clip, t * h * w."""
        return math.prod(self.token_shape)

    def validate_model(self, info: dict[str, Any]) -> None:
        model, loss, sampler = self.config.model, self.config.loss, self.config.sampling
        bits = int(info["latent_bits"])
        if model.factor_groups < 1 or bits % model.factor_groups:
            divisors = [d for d in range(1, bits + 1) if bits % d == 0]
            raise ConfigError(
                f"model.factor_groups={model.factor_groups} does not divide the cache's "
                f"latent_bits K={bits}. Use one of {divisors}.")
        if not 0.0 <= model.dropout < 1.0:
            raise ConfigError(f"model.dropout={model.dropout} must lie in [0, 1).")
        generation.check_probabilities(self.config, ("loss.label_dropout",))

        for field, name in (("loss.mask_schedule", loss.mask_schedule),
                            ("sampling.mask_schedule", sampler.mask_schedule)):
            if name not in mask_schedule.SCHEDULES:
                raise ConfigError(f"{field}={name!r} is unknown. Use one of "
                                  f"{mask_schedule.SCHEDULES}.")
        if sampler.num_steps > self.seq_len:
            raise ConfigError(
                f"sampling.num_steps={sampler.num_steps} is more than the {self.seq_len} tokens "
                f"of the cache's {self.token_shape} grid, but every decoding step reveals at "
                f"least one token. Use at most {self.seq_len}.")
        if sampler.temperature < 0:
            raise ConfigError(f"sampling.temperature={sampler.temperature} must be at least 0.")

    def build_model(self, rngs: nnx.Rngs) -> MaskGitTransformer:
        model = self.config.model
        return MaskGitTransformer(
            codebook_bits=int(self.cache_info["latent_bits"]),
            factor_groups=model.factor_groups,
            num_classes=int(self.cache_info["num_classes"]),
            seq_len=self.seq_len,
            embed_dim=model.embed_dim,
            depth=model.depth,
            num_heads=model.num_heads,
            mlp_dim=model.mlp_dim,
            dropout=model.dropout,
            rngs=rngs)

    def model_loss(self, model, batch, rng, *, train):
        loss = self.config.loss
        return losses.masked_token_loss(
            model, batch, rng,
            label_dropout=loss.label_dropout if train else 0.0,
            schedule=loss.mask_schedule,
            dropout=train)

    def sample_outputs(self, model, labels, rng):
        sampler = self.config.sampling
        return sampling.sample(
            model, labels=labels, shape=self.token_shape, num_steps=sampler.num_steps, rng=rng,
            guidance_scale=sampler.guidance_scale, temperature=sampler.temperature,
            schedule=sampler.mask_schedule)

    def outputs_to_codes(self, outputs: np.ndarray) -> np.ndarray:
        """Map token ids (N, t, h, w) to their LFQ codes (N, t, h, w, K) of -1 and +1."""
        bits = int(self.cache_info["latent_bits"])
        return np.asarray(jax.device_get(lfq.ids_to_bits(jnp.asarray(outputs), bits)))


def make_task(config: ml_collections.ConfigDict, **kwargs) -> MaskGitTask:
    """Build the MaskGIT task; `kwargs` go to `GeneratorTask.__init__` (cache_info, tokenizer)."""
    return MaskGitTask(config, **kwargs)
