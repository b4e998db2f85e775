"""Vision Transformer (Dosovitskiy et al., 2021) with named intermediate representations.

The maths, initialisers and parameter names follow vit_jax `models_vit.py`, so the official `.npz`
checkpoints map onto the param tree by name. Two names need care: pre-linen Flax numbered children
with ONE counter per parent, which gives `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
`LayerNorm_2`, `MlpBlock_3` inside each encoder block. Linen would number per type
(`LayerNorm_1`, `MlpBlock_0`), so every submodule here gets an explicit `name=`.

The blocks (attention, MLP, encoder, MAP pooling) are in models/vit_blocks.py.

Every forward pass returns `(logits, out)`, where `out` holds the named representations in forward
order ('embedding', 'block00/ln0', ..., 'encoder_norm', 'pre_logits', 'logits'; see
vit_analysis/models/layers.py).

Options beyond vit_jax (all off by default, so the default ViT is vit_jax's, bit for bit), for
the timm and big_vision families (models/timm_vit.py, models/big_vision_vit.py):
  * `class_token` / `num_registers`: prefix tokens [CLS, reg_1..reg_R] before the patch grid;
    `posemb_prefix=False` adds the position embedding to the patches only, before the prefix is
    concatenated (timm `no_embed_class`, big_vision);
  * `posemb='sincos2d'`: big_vision's fixed 2-D sin-cos embedding instead of a learned one;
  * `pre_norm`: a LayerNorm on the tokens before the first block (CLIP's `norm_pre`), usually
    with `embedding_bias=False`;
  * `layerscale_init`: per-channel LayerScale on both residual branches (DINOv2);
  * `mlp_activation`: 'gelu_tanh' (vit_jax), 'gelu' (exact erf, timm) or 'quick_gelu'
    (x * sigmoid(1.702 x), OpenAI CLIP);
  * `ln_eps`: LayerNorm epsilon (1e-6 vit_jax/timm, 1e-5 CLIP);
  * `classifier`: 'token', 'gap' (mean over the grid tokens) or 'map' (big_vision's attention
    pooling, `MAPHead`); `fc_norm=True` moves the final LayerNorm after the pooling (timm).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_analysis.models.vit_blocks import (
  ACTIVATIONS,
  LN_EPS,
  POSEMBS,
  Encoder,
  MAPHead,
)

Array = jax.Array
CLASSIFIERS = ('token', 'gap', 'map')


def attention_output_kernel(params: Any, block: int) -> Array:
  """The output projection of block `block`'s attention, [H, d_h, D], from a ViT's (or hybrid's)
  params: what maps the per-head outputs `out['blockNN/attn_heads']` back to the stream."""
  try:
    return params['Transformer'][f'encoderblock_{block}']['MultiHeadDotProductAttention_1'][
        'out']['kernel']
  except KeyError as e:
    raise KeyError(f'no attention output kernel of block {block} in these params (missing '
                   f'{e}); is this a ViT?') from e


# Fields that `encode_and_classify` reads, with the values that give vit_jax's ViT: a module
# without a field (the hybrid) gets this value.
_TOKEN_DEFAULTS = {
    'class_token': None, 'num_registers': 0, 'posemb': 'learn', 'posemb_prefix': True,
    'pre_norm': False, 'layerscale_init': None, 'mlp_activation': 'gelu_tanh', 'ln_eps': LN_EPS,
    'fc_norm': False}


def _opt(m: nn.Module, name: str) -> Any:
  return getattr(m, name, _TOKEN_DEFAULTS[name])


def has_class_token(m: nn.Module) -> bool:
  """Whether token 0 of `m` is a CLS token (explicit `class_token`, else classifier 'token')."""
  explicit = _opt(m, 'class_token')
  return m.classifier == 'token' if explicit is None else bool(explicit)


def encode_and_classify(m: nn.Module, x: Array, grid: tuple[int, int], *,
                        train: bool) -> tuple[Array, dict[str, Array]]:
  """Everything after the patch embedding, shared by the ViT and the hybrid.

  Must be called inside `m`'s compact `__call__`: the parameters ('cls', 'reg', 'Transformer',
  'MAPHead_0', 'fc_norm', 'pre_logits', 'head') are created in `m`'s scope.

  Args:
    m: the calling module (fields of `VisionTransformer`; missing ones take vit_jax's values).
    x: [b, N, D] grid tokens, row-major.
    grid: (rows, cols), rows * cols == N.
    train: enables dropout.

  Returns:
    (logits [b, num_classes] (pre_logits when there is no head), out in forward order).
  """
  n, _, c = x.shape
  prefix = []
  if has_class_token(m):
    prefix.append(jnp.tile(m.param('cls', nn.initializers.zeros, (1, 1, c), x.dtype), (n, 1, 1)))
  registers = _opt(m, 'num_registers')
  if registers:
    reg = m.param('reg', nn.initializers.normal(stddev=1e-6), (1, registers, c), x.dtype)
    prefix.append(jnp.tile(reg, (n, 1, 1)))
  num_prefix = int(has_class_token(m)) + registers
  fc_norm = _opt(m, 'fc_norm')
  encoder = Encoder(
      num_layers=m.num_layers, mlp_dim=m.mlp_dim, num_heads=m.num_heads,
      dropout_rate=m.dropout_rate, attention_dropout_rate=m.attention_dropout_rate,
      skip_removed=tuple(m.skip_removed), precision=m.precision, posemb=_opt(m, 'posemb'),
      posemb_prefix=_opt(m, 'posemb_prefix'), pre_norm=_opt(m, 'pre_norm'),
      final_norm=not fc_norm, layerscale_init=_opt(m, 'layerscale_init'),
      activation=_opt(m, 'mlp_activation'), ln_eps=_opt(m, 'ln_eps'), name='Transformer')
  x, out = encoder(x, jnp.concatenate(prefix, axis=1) if prefix else None, grid=grid,
                   train=train)
  if m.classifier == 'token':
    x = x[:, 0]
  elif m.classifier == 'gap':
    x = jnp.mean(x[:, num_prefix:], axis=1)
  else:
    x = out['map'] = MAPHead(m.num_heads, m.mlp_dim, m.precision, _opt(m, 'ln_eps'),
                             _opt(m, 'mlp_activation'), name='MAPHead_0')(x[:, num_prefix:])
  if fc_norm:
    x = out['fc_norm'] = nn.LayerNorm(epsilon=_opt(m, 'ln_eps'), name='fc_norm')(x)
  if m.representation_size is not None:
    x = nn.tanh(nn.Dense(m.representation_size, precision=m.precision, name='pre_logits')(x))
  out['pre_logits'] = x
  if m.num_classes:
    x = nn.Dense(m.num_classes, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(m.head_bias_init),
                 precision=m.precision, name='head')(x)
  out['logits'] = x
  return x, out


def check_token_options(m: nn.Module) -> None:
  """Raises ValueError for option combinations the token pipeline does not define."""
  if m.classifier not in CLASSIFIERS:
    raise ValueError(f'classifier must be one of {CLASSIFIERS}, got {m.classifier!r}')
  if m.classifier == 'token' and not has_class_token(m):
    raise ValueError("classifier='token' needs a class token (class_token=False given)")
  if _opt(m, 'posemb') not in POSEMBS:
    raise ValueError(f"posemb must be one of {POSEMBS}, got {_opt(m, 'posemb')!r}")
  if _opt(m, 'posemb') == 'sincos2d' and _opt(m, 'posemb_prefix'):
    raise ValueError('sincos2d embeds only the grid: set posemb_prefix=False')
  if _opt(m, 'mlp_activation') not in ACTIVATIONS:
    raise ValueError(f"mlp_activation must be one of {sorted(ACTIVATIONS)}, got "
                     f"{_opt(m, 'mlp_activation')!r}")
  if _opt(m, 'num_registers') < 0:
    raise ValueError(f"num_registers must be >= 0, got {_opt(m, 'num_registers')}")
  bad = [i for i in m.skip_removed if not 0 <= i < m.num_layers]
  if bad:
    raise ValueError(f'skip_removed {bad} out of range for {m.num_layers} blocks')


class VisionTransformer(nn.Module):
  """ViT as in vit_jax: patch embedding, prefix tokens, encoder, pooling, pre_logits, head.

  Attributes:
    num_classes: head width; 0/None gives no head (logits = pre_logits).
    patch_size: P (square patches, stride P, VALID).
    hidden_size: D.
    mlp_dim: MLP hidden width.
    num_heads: H.
    num_layers: number of encoder blocks.
    classifier: 'token' (token 0 after the final norm), 'gap' (mean over the grid tokens) or
      'map' (attention pooling over the grid tokens, `MAPHead`).
    representation_size: width of the Dense+tanh 'pre_logits' layer (ImageNet-21k checkpoints);
      None for none.
    image_size: nominal input size (sets nothing: the position embedding takes its length from the
      input at init); used by callers such as checkpoint loading and `layer_names` defaults.
    dropout_rate, attention_dropout_rate: used only with train=True.
    skip_removed: block indices whose two residual connections are removed.
    head_bias_init: constant init of the head bias.
    precision: matmul precision for every Dense/attention einsum (None = JAX default, as vit_jax).
    class_token: whether a CLS token ('cls') is prepended; None: exactly when classifier is
      'token' (vit_jax). timm's MAE/DINO-style models with GAP keep theirs (True).
    num_registers: R register tokens ('reg' [1, R, D]) after the CLS token (DINOv2-reg).
    posemb: 'learn' or 'sincos2d' (big_vision, fixed).
    posemb_prefix: the learned position embedding has entries for the prefix tokens (vit_jax,
      timm default); False: grid only, prefix concatenated after the add (timm
      `no_embed_class`, big_vision).
    pre_norm: LayerNorm on the embedded tokens before the first block (CLIP).
    embedding_bias: the patch-embedding conv has a bias (CLIP's has none).
    layerscale_init: LayerScale initial value; None for no LayerScale.
    mlp_activation: 'gelu_tanh' | 'gelu' | 'quick_gelu'.
    ln_eps: epsilon of every LayerNorm.
    fc_norm: the final LayerNorm comes after the pooling ('fc_norm') instead of before
      ('Transformer/encoder_norm'), as timm with global_pool='avg'.
    normalization: how input images must be normalised (see models.info): 'minus_one_one' or
      ((mean_r, mean_g, mean_b), (std_r, std_g, std_b)) in [0, 1] pixel units.
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
  class_token: bool | None = None
  num_registers: int = 0
  posemb: str = 'learn'
  posemb_prefix: bool = True
  pre_norm: bool = False
  embedding_bias: bool = True
  layerscale_init: float | None = None
  mlp_activation: str = 'gelu_tanh'
  ln_eps: float = LN_EPS
  fc_norm: bool = False
  normalization: Any = 'minus_one_one'

  @property
  def has_class_token(self) -> bool:
    return has_class_token(self)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Forward pass.

    Args:
      images: [b, h, w, c] float, h and w divisible by `patch_size`, normalised as
        `normalization` says.
      train: enables dropout (needs a 'dropout' rng when a rate is > 0).

    Returns:
      (logits [b, num_classes], out: {name: representation} in forward order).
    """
    self._check(images)
    x = nn.Conv(self.hidden_size, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding='VALID', use_bias=self.embedding_bias, precision=self.precision,
                name='embedding')(images)
    n, h, w, c = x.shape
    return encode_and_classify(self, jnp.reshape(x, (n, h * w, c)), (h, w), train=train)

  def _check(self, images: Array) -> None:
    check_token_options(self)
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
  # Small CPU variants for 32 px inputs (docs/method.md#models).
  variants['ViT-Ti_4'] = _vit(4, 192, 12, 768, 3, image_size=32)
  variants['ViT-demo_4'] = _vit(4, 128, 6, 256, 4, image_size=32)
  variants['ViT-smoke_8'] = _vit(8, 32, 2, 64, 2, image_size=32)
  for base in ('ViT-Ti_4', 'ViT-demo_4', 'ViT-smoke_8'):
    variants[f'{base}-gap'] = dict(variants[base], classifier='gap')
  return variants


VARIANTS: dict[str, dict[str, Any]] = _variants()
MODEL_CLASS = VisionTransformer
