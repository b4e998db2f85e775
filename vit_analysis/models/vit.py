"""Vision Transformer (Dosovitskiy et al., 2021) with named intermediate representations.

The maths, initialisers and parameter names follow vit_jax `models_vit.py`, so the official `.npz`
checkpoints map onto the param tree by name. Two names need care: pre-linen Flax numbered children
with ONE counter per parent, which gives `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
`LayerNorm_2`, `MlpBlock_3` inside each encoder block. Linen would number per type
(`LayerNorm_1`, `MlpBlock_0`), so every submodule here gets an explicit `name=`.

Attention is written out (instead of `nn.MultiHeadDotProductAttention`) so that the per-head weights
and the per-head outputs before the output projection can be recorded. Parameter shapes, initialisers
and the order of operations (query scaled by 1/sqrt(d_h) before q.k, softmax in float32) are those of
Flax's module, so the outputs agree with vit_jax to float32 rounding.

Every forward pass returns `(logits, out)`, where `out` holds the representations listed in
contracts.md in forward order ('embedding', 'block00/ln0', ..., 'encoder_norm', 'pre_logits',
'logits').
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
# Flax's LayerNorm default, and the value every official ViT/Mixer checkpoint was trained with.
LN_EPS = 1e-6


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU (tanh approximation, as vit_jax) -> Dense.

  Attributes:
    mlp_dim: hidden width.
    dropout_rate: dropout after the GELU and after the output Dense (train only).
    precision: matmul precision (None = the JAX default, as in vit_jax).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, Array]:
    """x: [b, T, D] -> (output [b, T, D], hidden after GELU [b, T, mlp_dim])."""
    dense = lambda features, name: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), precision=self.precision, name=name)
    hidden = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))  # approximate=True is Flax's default.
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
  """Pre-LN transformer block: x += Attn(LN0(x)); x += MLP(LN2(x)).

  Attributes:
    mlp_dim, num_heads, dropout_rate, attention_dropout_rate, precision: as in vit_jax.
    skip: False removes both residual adds (paper's no-skip experiment): the attention sub-block
      outputs Attn(LN0(x)) and the block outputs MLP(LN2(that)).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip: bool = True
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, dict[str, Array]]:
    """x: [b, T, D] -> (block output [b, T, D], {sub-name: representation} in forward order)."""
    out = {}
    out['ln0'] = y = nn.LayerNorm(epsilon=LN_EPS, name='LayerNorm_0')(x)
    y, out['attn_weights'], out['attn_heads'] = SelfAttention(
        self.num_heads, self.attention_dropout_rate, self.precision,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    out['sa'] = y
    out['+sa'] = x = x + y if self.skip else y
    out['ln2'] = y = nn.LayerNorm(epsilon=LN_EPS, name='LayerNorm_2')(x)
    y, out['mlp_hidden'] = MlpBlock(
        self.mlp_dim, self.dropout_rate, self.precision, name='MlpBlock_3')(
            y, deterministic=deterministic)
    out['mlp'] = y
    x = x + y if self.skip else y
    return x, out


class PosEmbed(nn.Module):
  """Learned position embedding [1, T, D] (BERT init, stddev 0.02), shaped from the input."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                      (1,) + x.shape[1:], x.dtype)


class Encoder(nn.Module):
  """Position embedding, the encoder blocks and the final LayerNorm ('Transformer' in the npz)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip_removed: tuple[int, ...] = ()
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Array]]:
    """x: [b, T, D] tokens (CLS first if any) -> (normed tokens [b, T, D], out)."""
    out = {}
    # The position embedding is sized from the input at init, as vit_jax's AddPositionEmbs.
    x = x + PosEmbed(name='posembed_input')(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    out['embedding'] = x
    for i in range(self.num_layers):
      x, block_out = Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          skip=i not in self.skip_removed, precision=self.precision,
          name=f'encoderblock_{i}')(x, deterministic=not train)
      out.update({f'block{i:02d}/{k}': v for k, v in block_out.items()})
      out[f'block{i:02d}'] = x
    out['encoder_norm'] = x = nn.LayerNorm(epsilon=LN_EPS, name='encoder_norm')(x)
    return x, out


class VisionTransformer(nn.Module):
  """ViT as in vit_jax: patch embedding, optional CLS token, encoder, pooling, pre_logits, head.

  Attributes:
    num_classes: head width; 0/None gives no head (logits = pre_logits).
    patch_size: P (square patches, stride P, VALID).
    hidden_size: D.
    mlp_dim: MLP hidden width.
    num_heads: H.
    num_layers: number of encoder blocks.
    classifier: 'token' (CLS token, token 0 after the final norm) or 'gap' (mean over tokens).
    representation_size: width of the Dense+tanh 'pre_logits' layer (ImageNet-21k checkpoints);
      None for none.
    image_size: nominal input size (sets nothing: the position embedding takes its length from the
      input at init); used by callers such as checkpoint loading and `layer_names` defaults.
    dropout_rate, attention_dropout_rate: used only with train=True.
    skip_removed: block indices whose two residual connections are removed.
    head_bias_init: constant init of the head bias.
    precision: matmul precision for every Dense/attention einsum (None = JAX default, as vit_jax).
  """
  num_classes: int | None
  patch_size: int
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  classifier: str = 'token'
  representation_size: int | None = None
  image_size: int = 224
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip_removed: tuple[int, ...] = ()
  head_bias_init: float = 0.0
  precision: Any = None

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Forward pass.

    Args:
      images: [b, h, w, c] float, h and w divisible by `patch_size`.
      train: enables dropout (needs a 'dropout' rng when a rate is > 0).

    Returns:
      (logits [b, num_classes], out: {name: representation} in forward order).
    """
    self._check(images)
    x = nn.Conv(self.hidden_size, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', precision=self.precision, name='embedding')(images)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x, out = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        skip_removed=tuple(self.skip_removed), precision=self.precision,
        name='Transformer')(x, train=train)
    x = x[:, 0] if self.classifier == 'token' else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, precision=self.precision,
                           name='pre_logits')(x))
    out['pre_logits'] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init),
                   precision=self.precision, name='head')(x)
    out['logits'] = x
    return x, out

  def _check(self, images: Array) -> None:
    if self.classifier not in ('token', 'gap'):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    bad = [i for i in self.skip_removed if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f'skip_removed {bad} out of range for {self.num_layers} blocks')
    if images.ndim != 4:
      raise ValueError(f'images must be [b, h, w, c], got shape {images.shape}')
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch size '
                       f'{self.patch_size}')


def _vit(patch: int, width: int, depth: int, mlp: int, heads: int, image_size: int = 224,
         **kw) -> dict[str, Any]:
  return dict(patch_size=patch, hidden_size=width, num_layers=depth, mlp_dim=mlp,
              num_heads=heads, image_size=image_size, **kw)


# (width, depth, MLP, heads) of vit_jax configs/models.py; L and H train with dropout 0.1.
_SIZES = {
    'Ti': (192, 12, 768, 3, 0.0),
    'S': (384, 12, 1536, 6, 0.0),
    'B': (768, 12, 3072, 12, 0.0),
    'L': (1024, 24, 4096, 16, 0.1),
    'H': (1280, 32, 5120, 16, 0.1),
}
_PATCHES = {'Ti': (16,), 'S': (16, 32), 'B': (8, 16, 32), 'L': (16, 32), 'H': (14,)}


def _variants() -> dict[str, dict[str, Any]]:
  variants = {}
  for size, patches in _PATCHES.items():
    width, depth, mlp, heads, dropout = _SIZES[size]
    for patch in patches:
      # vit_jax's L/32 config sets dropout 0 (differs from L/16).
      rate = 0.0 if (size, patch) == ('L', 32) else dropout
      base = f'ViT-{size}_{patch}'
      variants[base] = _vit(patch, width, depth, mlp, heads, dropout_rate=rate)
      # '-gap' and vit_jax's '-gap-norep' are the same model: GAP head, no representation layer.
      variants[f'{base}-gap'] = variants[f'{base}-gap-norep'] = dict(
          variants[base], classifier='gap')
  # Small CPU variants for 32 px inputs (contracts.md).
  variants['ViT-Ti_4'] = _vit(4, 192, 12, 768, 3, image_size=32)
  variants['ViT-demo_4'] = _vit(4, 128, 6, 256, 4, image_size=32)
  variants['ViT-smoke_8'] = _vit(8, 32, 2, 64, 2, image_size=32)
  for base in ('ViT-Ti_4', 'ViT-demo_4', 'ViT-smoke_8'):
    variants[f'{base}-gap'] = dict(variants[base], classifier='gap')
  return variants


VARIANTS: dict[str, dict[str, Any]] = _variants()
MODEL_CLASS = VisionTransformer
