"""MLP-Mixer (Tolstikhin et al., 2021) with named intermediate representations.

Maths, initialisers and parameter names follow vit_jax `models_mixer.py` (Linen from the start, so
linen's automatic names already match the npz: 'stem', 'MixerBlock_{i}/LayerNorm_0',
'.../token_mixing/Dense_0', ..., 'pre_head_layer_norm', 'head'). Names are still set explicitly so
that the mapping does not depend on call order.

Block: x += T(MLP_tok(T(LN0(x)))); x += MLP_ch(LN1(x)), T = swap tokens and channels. After the
blocks: LayerNorm, token mean, head. There is no position embedding, so the token count (and so the
image size) is fixed by the parameters.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_analysis.models import layers

Array = jax.Array
LN_EPS = 1e-6


class MlpBlock(nn.Module):
  """Dense -> GELU (tanh approximation) -> Dense back to the input width."""
  mlp_dim: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., n] -> [..., n]."""
    y = nn.gelu(nn.Dense(self.mlp_dim, precision=self.precision, name='Dense_0')(x))
    return nn.Dense(x.shape[-1], precision=self.precision, name='Dense_1')(y)


class MixerBlock(nn.Module):
  """Token mixing then channel mixing, each pre-LN with a residual (unless `skip` is False)."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  skip: bool = True
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """x: [b, N, D] -> (block output [b, N, D], {sub-name: representation} in forward order)."""
    out = {}
    out['ln0'] = y = nn.LayerNorm(epsilon=LN_EPS, name='LayerNorm_0')(x)
    y = jnp.swapaxes(y, 1, 2)  # [b, D, N]: the MLP mixes along tokens.
    y = MlpBlock(self.tokens_mlp_dim, self.precision, name='token_mixing')(y)
    out['token_mixing'] = y = jnp.swapaxes(y, 1, 2)
    out['+token'] = x = x + y if self.skip else y
    out['ln1'] = y = nn.LayerNorm(epsilon=LN_EPS, name='LayerNorm_1')(x)
    out['channel_mixing'] = y = MlpBlock(
        self.channels_mlp_dim, self.precision, name='channel_mixing')(y)
    x = x + y if self.skip else y
    return x, out


class MlpMixer(nn.Module):
  """MLP-Mixer as in vit_jax.

  Attributes:
    num_classes: head width; 0/None gives no head (logits = pre_logits).
    patch_size: P (square patches, stride P).
    hidden_dim: D (channels per token).
    num_blocks: number of Mixer blocks.
    tokens_mlp_dim: hidden width of the token-mixing MLP.
    channels_mlp_dim: hidden width of the channel-mixing MLP.
    image_size: input size; fixes the token count N = (image_size / P)^2 of the parameters.
    skip_removed: block indices whose two residual connections are removed.
    precision: matmul precision (None = JAX default, as vit_jax).
  """
  num_classes: int | None
  patch_size: int
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  image_size: int = 224
  skip_removed: tuple[int, ...] = ()
  precision: Any = None

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Forward pass.

    Args:
      images: [b, h, w, c] float, h and w divisible by `patch_size`.
      train: unused (Mixer has no dropout); kept for a uniform model signature.

    Returns:
      (logits [b, num_classes], out: {name: representation} in forward order).
    """
    del train
    if images.ndim != 4:
      raise ValueError(f'images must be [b, h, w, c], got shape {images.shape}')
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch size '
                       f'{self.patch_size}')
    bad = [i for i in self.skip_removed if not 0 <= i < self.num_blocks]
    if bad:
      raise ValueError(f'skip_removed {bad} out of range for {self.num_blocks} blocks')
    # vit_jax uses padding 'SAME'; with stride = kernel and divisible sizes that equals 'VALID'.
    x = nn.Conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', precision=self.precision, name='stem')(images)
    n, h, w, c = x.shape
    out = {'stem': (x := jnp.reshape(x, (n, h * w, c)))}
    for i in range(self.num_blocks):
      x, block_out = MixerBlock(
          self.tokens_mlp_dim, self.channels_mlp_dim, skip=i not in self.skip_removed,
          precision=self.precision, name=f'MixerBlock_{i}')(x)
      out.update({layers.block(i, k): v for k, v in block_out.items()})
      out[layers.block(i)] = x
    out['pre_head_layer_norm'] = x = nn.LayerNorm(epsilon=LN_EPS, name='pre_head_layer_norm')(x)
    out['pre_logits'] = x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                   precision=self.precision, name='head')(x)
    out['logits'] = x
    return x, out


def _mixer(patch: int, width: int, depth: int, tok: int, ch: int, image_size: int = 224):
  return {'patch_size': patch, 'hidden_dim': width, 'num_blocks': depth,
          'tokens_mlp_dim': tok, 'channels_mlp_dim': ch, 'image_size': image_size}


# (width, blocks, tokens MLP, channels MLP) from the Mixer paper / vit_jax configs.
_SIZES = {
    'S': (512, 8, 256, 2048),
    'B': (768, 12, 384, 3072),
    'L': (1024, 24, 512, 4096),
    'H': (1280, 32, 640, 5120),
}
_PATCHES = {'S': (16, 32), 'B': (16, 32), 'L': (16, 32), 'H': (14,)}

VARIANTS: dict[str, dict[str, Any]] = {
    f'Mixer-{size}_{patch}': _mixer(patch, *_SIZES[size])
    for size, patches in _PATCHES.items() for patch in patches
}
VARIANTS.update({
    # Small CPU variants for 32 px inputs; Ti follows the S/B ratios (tokens D/2, channels 4D).
    'Mixer-Ti_4': _mixer(4, 192, 12, 96, 768, image_size=32),
    'Mixer-demo_4': _mixer(4, 128, 6, 64, 256, image_size=32),
    'Mixer-smoke_8': _mixer(8, 32, 2, 16, 64, image_size=32),
})
MODEL_CLASS = MlpMixer
