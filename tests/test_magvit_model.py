"""Tests of the causal video tokenizer and its loss on a tiny configuration."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvit import layers
from magvit import losses
from magvit import model as model_lib

# Two stages, each halving time and space: temporal factor 4, spatial factor 4.
TINY = dict(base_channels=4, channel_multipliers=(1, 2), num_res_blocks=1,
            temporal_downsample=(True, True), latent_bits=6, num_groups=2)
SIZE = 8


def _rngs():
  # With the default threefry keys, each distinct parameter shape compiles its own random
  # kernel, which made this model's initialisation about 5 times slower on CPU than rbg keys.
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module", params=["zeros", "replicate"])
def any_padding_tokenizer(request):
  """The tiny tokenizer once per time-padding mode, for the causality tests."""
  return model_lib.Tokenizer(**TINY, time_padding=request.param, rngs=_rngs())


@pytest.fixture(scope="module")
def tokenizer():
  return model_lib.Tokenizer(**TINY, rngs=_rngs())


# Jitted entry points: one compile per input shape is cheaper here than op-by-op dispatch.
@nnx.jit
def _encode(model, video):
  return model.encode(video)


@nnx.jit
def _decode(model, latents):
  return model.decode(latents)


@nnx.jit
def _reconstruct(model, video):
  return model(video)


def _video(seed, num_frames, batch=1):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (batch, num_frames, SIZE, SIZE, 3)), jnp.float32)


def _perturb_from(video, first_frame, seed=100):
  noise = _video(seed, video.shape[1] - first_frame, video.shape[0])
  return video.at[:, first_frame:].set(noise)


def _changed(a, b):
  return float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_factors_and_codebook_size(tokenizer):
  assert tokenizer.temporal_factor == 4
  assert tokenizer.spatial_factor == 4
  assert tokenizer.codebook_size == 2 ** TINY["latent_bits"]


def test_encoder_is_causal(any_padding_tokenizer):
  tokenizer = any_padding_tokenizer
  video = _video(0, 9)
  z = _encode(tokenizer, video)

  # Latent i summarises frames up to 4i, so changing frames from 4i + 1 on keeps latents 0..i.
  for i in range(2):
    z_changed = _encode(tokenizer, _perturb_from(video, 4 * i + 1))
    chex.assert_trees_all_close(z_changed[:, :i + 1], z[:, :i + 1], atol=1e-5)
    assert _changed(z_changed[:, i + 1], z[:, i + 1]), f"latent {i + 1} ignored its frames"


def test_frame_zero_changes_latent_zero(any_padding_tokenizer):
  tokenizer = any_padding_tokenizer
  video = _video(0, 9)
  z = _encode(tokenizer, video)
  z_changed = _encode(tokenizer, video.at[:, 0].set(_video(100, 1)[:, 0]))
  assert _changed(z_changed[:, 0], z[:, 0])


def test_image_encodes_like_first_frame(any_padding_tokenizer):
  tokenizer = any_padding_tokenizer
  video = _video(1, 9)
  z_video = _encode(tokenizer, video)
  z_image = _encode(tokenizer, video[:, :1])

  chex.assert_shape(z_image, (1, 1, 2, 2, TINY["latent_bits"]))
  chex.assert_trees_all_close(z_image[:, 0], z_video[:, 0], atol=1e-5)


def test_decoder_is_causal(any_padding_tokenizer):
  tokenizer = any_padding_tokenizer
  rng = np.random.default_rng(2)
  latents = jnp.asarray(rng.choice([-1.0, 1.0], (1, 3, 2, 2, TINY["latent_bits"])), jnp.float32)
  frames = _decode(tokenizer, latents)

  # Latent i decodes to frames 4i - 3 .. 4i: changing it keeps the frames before and changes
  # each of those four.
  for i in (1, 2):
    changed = _decode(tokenizer, latents.at[:, i].multiply(-1.0))
    chex.assert_trees_all_close(changed[:, :4 * i - 3], frames[:, :4 * i - 3], atol=1e-5)
    for j in range(4 * i - 3, 4 * i + 1):
      assert _changed(changed[:, j], frames[:, j]), f"frame {j} ignored latent {i}"

  # A single latent frame decodes to the first frame of the longer decode.
  single = _decode(tokenizer, latents[:, :1])
  chex.assert_shape(single, (1, 1, SIZE, SIZE, 3))
  chex.assert_trees_all_close(single[:, 0], frames[:, 0], atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_frame_count_contract(tokenizer, k):
  video = _video(3, 1 + 4 * k)
  recon, aux = _reconstruct(tokenizer, video)

  chex.assert_shape(aux["z"], (1, 1 + k, 2, 2, TINY["latent_bits"]))
  chex.assert_shape(aux["ids"], (1, 1 + k, 2, 2))
  chex.assert_type(aux["ids"], jnp.int32)
  chex.assert_shape(recon, video.shape)
  for name in ("per_sample_entropy", "codebook_entropy", "entropy_penalty", "commitment_loss"):
    chex.assert_shape(aux[name], ())


def test_eight_frames_raise_with_valid_choices(tokenizer):
  with pytest.raises(ValueError, match=r"num_frames=8 is not of the form 1\+4k; use 5 or 9"):
    tokenizer.encode(_video(0, 8))


def test_bad_shapes_raise(tokenizer):
  with pytest.raises(ValueError, match="not divisible by the spatial factor 4"):
    tokenizer.encode(jnp.zeros((1, 5, SIZE + 2, SIZE, 3)))
  with pytest.raises(ValueError, match="rank 5"):
    tokenizer.encode(jnp.zeros((1, SIZE, SIZE, 3)))
  with pytest.raises(ValueError, match="in_channels=3"):
    tokenizer.encode(jnp.zeros((1, 5, SIZE, SIZE, 1)))
  with pytest.raises(ValueError, match="expected"):
    tokenizer.decode(jnp.zeros((1, 2, 2, 2, TINY["latent_bits"] + 1)))


def test_decode_ids_matches_reconstruction(tokenizer):
  video = _video(4, 5)
  recon, aux = _reconstruct(tokenizer, video)
  decoded = nnx.jit(lambda model, ids: model.decode_ids(ids))(tokenizer, aux["ids"])
  chex.assert_trees_all_close(decoded, recon, atol=1e-5)


def test_num_frame_helpers():
  assert model_lib.valid_num_frames(9, 4)
  assert model_lib.valid_num_frames(1, 4)
  assert not model_lib.valid_num_frames(8, 4)
  assert not model_lib.valid_num_frames(0, 4)
  assert model_lib.nearest_valid_num_frames(8, 4) == 9
  assert model_lib.nearest_valid_num_frames(6, 4) == 5
  assert model_lib.nearest_valid_num_frames(7, 4) == 5  # tie: the shorter clip
  assert model_lib.nearest_valid_num_frames(0, 4) == 1
  assert model_lib.nearest_valid_num_frames(17, 4) == 17


def test_invalid_config_raises():
  with pytest.raises(ValueError, match="one entry per stage"):
    model_lib.Tokenizer(**{**TINY, "temporal_downsample": (True,)}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_groups=3"):
    model_lib.Tokenizer(**{**TINY, "num_groups": 3}, rngs=nnx.Rngs(0))


def test_parameters_carry_logical_axes(tokenizer):
  flat = nnx.to_flat_state(nnx.state(tokenizer, nnx.Param))
  assert len(flat) > 0
  for path, variable in flat:
    axes = variable.get_metadata().get("out_sharding")
    assert axes is not None, f"{path} has no logical axis names"
    if path[-1] == "kernel":
      assert tuple(axes) == layers.CONV_KERNEL_AXES, path
    elif path[-1] == "scale":
      assert tuple(axes) == ("norm",), path
    else:
      assert tuple(axes) in {("conv_out",), ("norm",)}, path


@pytest.mark.parametrize("kernel_size,strides", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)),
                                                ((3, 3, 3), (2, 1, 1)), ((1, 1, 1), (1, 1, 1))])
def test_conv_implementations_agree(kernel_size, strides):
  video = _video(9, 5, batch=2)
  outputs = []
  for implementation in layers.CONV_IMPLEMENTATIONS:
    conv = layers.CausalConv3d(3, 5, kernel_size, strides=strides, time_padding="replicate",
                               conv_implementation=implementation, rngs=_rngs())
    outputs.append(conv(video))
  chex.assert_shape(outputs[0], (2, (5 - 1) // strides[0] + 1, SIZE // strides[1],
                                 SIZE // strides[2], 5))
  chex.assert_trees_all_close(outputs[0], outputs[1], atol=1e-4)


def test_group_norm_keeps_frames_apart():
  norm = layers.FrameGroupNorm(4, 2, rngs=nnx.Rngs(0))
  x = _video(5, 3)[..., :1] * jnp.ones((4,))
  y = norm(x)
  y_changed = norm(x.at[:, 2].multiply(10.0))
  chex.assert_trees_all_close(y_changed[:, :2], y[:, :2], atol=1e-6)


def test_loss_terms_and_total():
  recon, target = _video(6, 5), _video(7, 5)
  aux = {"per_sample_entropy": jnp.float32(0.5), "codebook_entropy": jnp.float32(2.0),
         "entropy_penalty": jnp.float32(-1.5), "commitment_loss": jnp.float32(0.3)}

  for kind, expected_recon in (("l1", jnp.mean(jnp.abs(recon - target))),
                               ("l2", jnp.mean(jnp.square(recon - target)))):
    loss, metrics = losses.tokenizer_loss(recon, target, aux, recon_loss=kind, recon_weight=2.0,
                                          entropy_weight=0.1, commitment_weight=0.25)
    np.testing.assert_allclose(float(metrics["recon_loss"]), float(expected_recon), rtol=1e-6)
    total = 2.0 * expected_recon + 0.1 * -1.5 + 0.25 * 0.3
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["total_loss"]), float(total), rtol=1e-6)
    assert set(metrics) >= {"entropy_penalty", "per_sample_entropy", "codebook_entropy",
                            "commitment_loss"}


def test_loss_rejects_unsupported_options():
  video = _video(6, 5)
  aux = {name: jnp.float32(0.0) for name in
         ("per_sample_entropy", "codebook_entropy", "entropy_penalty", "commitment_loss")}
  with pytest.raises(NotImplementedError, match="perceptual"):
    losses.tokenizer_loss(video, video, aux, perceptual_weight=0.1)
  with pytest.raises(NotImplementedError, match="GAN"):
    losses.tokenizer_loss(video, video, aux, gan_weight=0.1)
  with pytest.raises(ValueError, match="recon_loss"):
    losses.tokenizer_loss(video, video, aux, recon_loss="huber")


def test_loss_gradient_reaches_encoder(tokenizer):
  video = _video(8, 5)

  def loss_fn(model):
    recon, aux = model(video)
    return losses.tokenizer_loss(recon, video, aux)[0]

  grads = nnx.jit(nnx.grad(loss_fn))(tokenizer)
  encoder_grad = grads["encoder"]["conv_in"]["kernel"][...]
  decoder_grad = grads["decoder"]["conv_out"]["kernel"][...]
  assert np.all(np.isfinite(np.asarray(encoder_grad)))
  # The reconstruction term reaches the encoder only through the straight-through estimator.
  assert float(jnp.max(jnp.abs(encoder_grad))) > 0.0
  assert float(jnp.max(jnp.abs(decoder_grad))) > 0.0
