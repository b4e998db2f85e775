"""Transformer building blocks of the ViT: attention, MLP, encoder block, encoder, MAP pooling.

Maths, initialisers and parameter names follow vit_jax `models_vit.py` (see models/vit.py for
the naming rules); the options beyond vit_jax are described in models/vit.py.

Attention is written out (instead of `nn.MultiHeadDotProductAttention`) so that the per-head
weights and the per-head outputs before the output projection can be recorded. Parameter shapes,
initialisers and the order of operations (query scaled by 1/sqrt(d_h) before q.k, softmax in
float32) are those of Flax's module, so the outputs agree with vit_jax to float32 rounding.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_analysis.models import layers

Array = jax.Array
# Flax's LayerNorm default, and the value every official ViT/Mixer checkpoint was trained with.
LN_EPS = 1e-6

ACTIVATIONS = {
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=False),
    # OpenAI CLIP: x * sigmoid(1.702 x).
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
}
POSEMBS = ('learn', 'sincos2d')


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> activation -> Dense.

  Attributes:
    mlp_dim: hidden width.
    dropout_rate: dropout after the activation and after the output Dense (train only).
    precision: matmul precision (None = the JAX default, as in vit_jax).
    activation: a key of `ACTIVATIONS` ('gelu_tanh' is vit_jax's and Flax's default).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  precision: Any = None
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, Array]:
    """x: [b, T, D] -> (output [b, T, D], hidden after the activation [b, T, mlp_dim])."""
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), precision=self.precision, name=name)
    hidden = ACTIVATIONS[self.activation](dense(self.mlp_dim, 'Dense_0')(x))
    y = nn.Dropout(rate=self.dropout_rate)(hidden, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return y, hidden


class SelfAttention(nn.Module):
  """Multi-head dot-product self-attention with Flax MHA's parameters and maths.

  Parameters: 'query', 'key', 'value' kernels [D, H, d_h] and biases [H, d_h]; 'out' kernel
  [H, d_h, D] and bias [D] (DenseGeneral, as in `nn.MultiHeadDotProductAttention`).

  Attributes:
    num_heads: H; d_h = D // H.
    dropout_rate: dropout on the attention weights (train only).
    precision: matmul precision.
  """
  num_heads: int
  dropout_rate: float = 0.0
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, Array, Array]:
    """Self-attention.

    Args:
      x: [b, T, D].
      deterministic: disables dropout.

    Returns:
      (output [b, T, D], weights [b, H, T, T], per-head outputs before projection [b, T, H, d_h]).
    """
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1,
        kernel_init=nn.initializers.xavier_uniform(), precision=self.precision, name=name)
    q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)  # [b, T, H, d_h]
    # Flax scales the query (not the logits) by 1/sqrt(d_h); same order here for bitwise parity.
    q = q / jnp.sqrt(head_dim).astype(q.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    dropped = nn.Dropout(rate=self.dropout_rate, broadcast_dims=())(
        weights, deterministic=deterministic)
    heads = jnp.einsum('bhqk,bkhd->bqhd', dropped, v, precision=self.precision)
    y = nn.DenseGeneral(
        features=width, axis=(-2, -1), kernel_init=nn.initializers.xavier_uniform(),
        precision=self.precision, name='out')(heads)
    return y, weights, heads


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x += ls1 * Attn(LN0(x)); x += ls2 * MLP(LN2(x)).

  Attributes:
    mlp_dim, num_heads, dropout_rate, attention_dropout_rate, precision: as in vit_jax.
    skip: False removes both residual adds (paper's no-skip experiment): the attention sub-block
      outputs Attn(LN0(x)) and the block outputs MLP(LN2(that)).
    layerscale_init: None (no LayerScale) or the initial value of the per-channel scales 'ls1',
      'ls2' [D] that multiply each residual branch (DINOv2, timm `init_values`).
    activation: MLP activation (see `MlpBlock`).
    ln_eps: LayerNorm epsilon.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip: bool = True
  precision: Any = None
  layerscale_init: float | None = None
  activation: str = 'gelu_tanh'
  ln_eps: float = LN_EPS

  def _scale(self, name: str, y: Array) -> Array:
    if self.layerscale_init is None:
      return y
    gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (y.shape[-1],),
                       jnp.float32)
    return y * gamma.astype(y.dtype).reshape(1, 1, -1)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, dict[str, Array]]:
    """x: [b, T, D] -> (block output [b, T, D], {sub-name: representation} in forward order)."""
    out = {}
    out['ln0'] = y = nn.LayerNorm(epsilon=self.ln_eps, name='LayerNorm_0')(x)
    y, out['attn_weights'], out['attn_heads'] = SelfAttention(
        self.num_heads, self.attention_dropout_rate, self.precision,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    out['sa'] = y = self._scale('ls1', y)
    out['+sa'] = x = x + y if self.skip else y
    out['ln2'] = y = nn.LayerNorm(epsilon=self.ln_eps, name='LayerNorm_2')(x)
    y, out['mlp_hidden'] = MlpBlock(
        self.mlp_dim, self.dropout_rate, self.precision, self.activation, name='MlpBlock_3')(
            y, deterministic=deterministic)
    out['mlp'] = y = self._scale('ls2', y)
    x = x + y if self.skip else y
    return x, out


class PosEmbed(nn.Module):
  """Learned position embedding [1, T, D] (BERT init, stddev 0.02), shaped from the input."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                      (1,) + x.shape[1:], x.dtype)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Any = jnp.float32) -> Array:
  """big_vision's fixed 2-D embedding [1, h*w, width] (MoCo v3 recipe).

  With omega_k = temperature^(-k / (width/4 - 1)), k < width/4, the token at row r, column c
  (row-major) gets [sin(c omega), cos(c omega), sin(r omega), cos(r omega)].
  """
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, got {width}')
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature**omega)
  y = jnp.einsum('m,d->md', y.flatten(), omega)
  x = jnp.einsum('m,d->md', x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


class Encoder(nn.Module):
  """Position embedding, prefix tokens, blocks and final LayerNorm ('Transformer' in the npz).

  Attributes:
    num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, skip_removed,
    precision: as `VisionTransformer`.
    posemb: 'learn' (param 'posembed_input/pos_embedding') or 'sincos2d' (fixed).
    posemb_prefix: the learned embedding also covers the prefix tokens (vit_jax: CLS first,
      then the grid); False adds it to the grid tokens before the prefix is concatenated.
    pre_norm: LayerNorm 'norm_pre' on the tokens before the first block.
    final_norm: LayerNorm 'encoder_norm' after the last block.
    layerscale_init, activation, ln_eps: per block (see `Encoder1DBlock`).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip_removed: tuple[int, ...] = ()
  precision: Any = None
  posemb: str = 'learn'
  posemb_prefix: bool = True
  pre_norm: bool = False
  final_norm: bool = True
  layerscale_init: float | None = None
  activation: str = 'gelu_tanh'
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x: Array, prefix: Array | None = None, *, grid: tuple[int, int] = (0, 0),
               train: bool) -> tuple[Array, dict[str, Array]]:
    """Encodes tokens.

    Args:
      x: [b, N, D] grid tokens (row-major) when `prefix` is given; else all tokens [b, T, D]
        with any prefix already first (vit_jax's calling convention).
      prefix: [b, P, D] prefix tokens (CLS, registers) or None.
      grid: (rows, cols) of the grid, for sincos2d.
      train: enables dropout.

    Returns:
      (tokens [b, P + N, D] after the final norm, out).
    """
    out = {}
    if self.posemb == 'sincos2d':
      if grid[0] * grid[1] != x.shape[1]:
        raise ValueError(f'sincos2d needs the grid shape of the {x.shape[1]} tokens, got {grid}')
      x = x + posemb_sincos_2d(*grid, x.shape[-1], dtype=x.dtype)
    elif not self.posemb_prefix:
      x = x + PosEmbed(name='posembed_input')(x)
    if prefix is not None:
      x = jnp.concatenate([prefix, x], axis=1)
    if self.posemb == 'learn' and self.posemb_prefix:
      # The position embedding is sized from the input at init, as vit_jax's AddPositionEmbs.
      x = x + PosEmbed(name='posembed_input')(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    out['embedding'] = x
    if self.pre_norm:
      out['norm_pre'] = x = nn.LayerNorm(epsilon=self.ln_eps, name='norm_pre')(x)
    for i in range(self.num_layers):
      x, block_out = Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          skip=i not in self.skip_removed, precision=self.precision,
          layerscale_init=self.layerscale_init, activation=self.activation, ln_eps=self.ln_eps,
          name=f'encoderblock_{i}')(x, deterministic=not train)
      out.update({layers.block(i, k): v for k, v in block_out.items()})
      out[layers.block(i)] = x
    if self.final_norm:
      out['encoder_norm'] = x = nn.LayerNorm(epsilon=self.ln_eps, name='encoder_norm')(x)
    return x, out


class MAPHead(nn.Module):
  """big_vision's multi-head attention pooling: a learned probe attends to the tokens.

  y = MHA(query=probe, key=value=x) [b, 1, D]; y += MLP(LN(y)); returns y[:, 0]. Parameter names
  are big_vision's: 'probe' [1, 1, D], 'MultiHeadDotProductAttention_0', 'LayerNorm_0',
  'MlpBlock_0'.

  Attributes:
    num_heads: heads of the pooling attention.
    mlp_dim: MLP hidden width.
    precision, ln_eps, activation: as the encoder.
  """
  num_heads: int
  mlp_dim: int
  precision: Any = None
  ln_eps: float = LN_EPS
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [b, T, D] -> [b, D]."""
    n, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        precision=self.precision, name='MultiHeadDotProductAttention_0')(
            jnp.tile(probe, (n, 1, 1)), x)
    z = nn.LayerNorm(epsilon=self.ln_eps, name='LayerNorm_0')(y)
    z, _ = MlpBlock(self.mlp_dim, precision=self.precision, activation=self.activation,
                    name='MlpBlock_0')(z, deterministic=True)
    return (y + z)[:, 0]
