"""One description of a model: `describe(module, image_size) -> ModelInfo`.

Analyses ask questions of a model (is token 0 a CLS token? how many tokens come before the patch
grid? how many pixels per grid step? which layer presets apply? how must images be normalised?).
They are answered here, from the module's class and fields, and nowhere else.

Input normalisation: every built-in model of vit_jax / BiT / big_vision takes images in [-1, 1]
('minus_one_one'); timm-layout weights take images standardised by their recipe's (mean, std),
given in [0, 1] pixel units, e.g. ImageNet ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)):
x = (pixel / 255 - mean) / std per channel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

from vit_analysis.models import hybrid, mixer, resnet, vit

Normalization = str | tuple[tuple[float, float, float], tuple[float, float, float]]
MINUS_ONE_ONE = 'minus_one_one'
FAMILIES = ('vit', 'hybrid', 'resnet', 'mixer', 'other')


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What analyses need to know about a model.

  Attributes:
    family: 'vit' | 'hybrid' | 'resnet' | 'mixer' | 'other' (a Flax module that does not return
      `(logits, out)`; its layers are captured by method interception).
    has_cls: token 0 is a CLS token.
    num_prefix_tokens: tokens before the patch grid (CLS + registers); 0 for CNNs and Mixer.
    patch_size: pixels per token-grid step (hybrid: backbone stride x patch); None for ResNets
      and foreign modules.
    grid: (rows, cols) of the token grid at `image_size` (ResNet: of the last stage's feature
      map); None when unknown.
    num_blocks: transformer / mixer blocks, or ResNet units in total.
    num_heads: attention heads per block (None without attention).
    has_attention_weights: `out` holds 'block*/attn_weights' [b, H, T, T].
    layer_presets: which preset table of layer globs applies: 'vit' | 'resnet' | 'mixer' |
      'hybrid' | 'other' (no presets: globs only).
    normalization: 'minus_one_one' or (mean, std) per RGB channel in [0, 1] pixel units.
  """
  family: str
  has_cls: bool
  num_prefix_tokens: int
  patch_size: int | None
  grid: tuple[int, int] | None
  num_blocks: int
  num_heads: int | None
  has_attention_weights: bool
  layer_presets: str
  normalization: Normalization = MINUS_ONE_ONE

  @property
  def num_tokens(self) -> int | None:
    """Tokens per image (prefix + grid), None when there is no grid."""
    if self.grid is None:
      return None
    return self.num_prefix_tokens + self.grid[0] * self.grid[1]


def _grid(image_size: int, step: int) -> tuple[int, int]:
  if image_size % step:
    raise ValueError(f'image size {image_size} is not divisible by the patch size {step}')
  return (image_size // step,) * 2


def _ceil_half(n: int) -> int:
  return -(-n // 2)


def describe(module: nn.Module, image_size: int | None = None) -> ModelInfo:
  """Describes `module` at input size `image_size` (default: the module's `image_size`).

  Args:
    module: a vit_analysis model (from `create_model`) or any Flax linen module.
    image_size: square input side in pixels.

  Returns:
    The ModelInfo; foreign modules get family 'other' with no grid or heads.

  Raises:
    ValueError: image_size not divisible by the model's patch size.
  """
  size = image_size or getattr(module, 'image_size', None)
  norm = getattr(module, 'normalization', MINUS_ONE_ONE)
  if isinstance(module, vit.VisionTransformer):
    has_cls = module.has_class_token
    return ModelInfo(
        family='vit', has_cls=has_cls,
        num_prefix_tokens=int(has_cls) + module.num_registers,
        patch_size=module.patch_size,
        grid=_grid(size, module.patch_size) if size else None,
        num_blocks=module.num_layers, num_heads=module.num_heads, has_attention_weights=True,
        layer_presets='vit', normalization=_as_normalization(norm))
  if isinstance(module, hybrid.HybridViT):
    has_cls = vit.has_class_token(module)
    return ModelInfo(
        family='hybrid', has_cls=has_cls, num_prefix_tokens=int(has_cls),
        patch_size=module.patch_size,
        grid=_grid(size, module.patch_size) if size else None,
        num_blocks=module.num_layers, num_heads=module.num_heads, has_attention_weights=True,
        layer_presets='hybrid', normalization=MINUS_ONE_ONE)
  if isinstance(module, mixer.MlpMixer):
    return ModelInfo(
        family='mixer', has_cls=False, num_prefix_tokens=0, patch_size=module.patch_size,
        grid=_grid(size, module.patch_size) if size else None,
        num_blocks=module.num_blocks, num_heads=None, has_attention_weights=False,
        layer_presets='mixer', normalization=MINUS_ONE_ONE)
  if isinstance(module, resnet.ResNetV2):
    # Stride of the last stage: the root divides by 4 (none with the small stem), stages 2..n
    # by 2 each. BiT pads, so odd sizes round up at each stride-2 step.
    grid = None
    if size:
      side = size if module.small_stem else _ceil_half(_ceil_half(size))
      for _ in module.block_units[1:]:
        side = _ceil_half(side)
      grid = (side, side)
    return ModelInfo(
        family='resnet', has_cls=False, num_prefix_tokens=0, patch_size=None, grid=grid,
        num_blocks=sum(module.block_units), num_heads=None, has_attention_weights=False,
        layer_presets='resnet', normalization=MINUS_ONE_ONE)
  return ModelInfo(
      family='other', has_cls=False, num_prefix_tokens=0, patch_size=None, grid=None,
      num_blocks=0, num_heads=None, has_attention_weights=False, layer_presets='other',
      normalization=_as_normalization(norm))


def to_model_input(images: Any, normalization: Normalization) -> Any:
  """Maps images in [-1, 1] (the project's preprocessing) to a model's normalisation.

  With pixel p in [0, 1] and x = 2p - 1: (mean, std) gives (p - mean) / std per channel, i.e.
  ((x + 1) / 2 - mean) / std; 'minus_one_one' returns `images` unchanged.

  Args:
    images: [..., 3] array (NumPy or JAX) in [-1, 1].
    normalization: `ModelInfo.normalization`.

  Returns:
    An array of the same shape and dtype.
  """
  norm = _as_normalization(normalization)
  if norm == MINUS_ONE_ONE:
    return images
  if images.shape[-1] != 3:
    raise ValueError(f'images must have 3 channels last, got shape {images.shape}')
  mean, std = (np.asarray(v, np.float32) for v in norm)
  scale = (0.5 / std).astype(images.dtype)
  shift = ((0.5 - mean) / std).astype(images.dtype)
  shape = (1,) * (images.ndim - 1) + (3,)
  return images * scale.reshape(shape) + shift.reshape(shape)


def _as_normalization(norm: Any) -> Normalization:
  """Checks a normalization value; (0.5, 0.5) mean/std is [-1, 1] and is reported as such."""
  if norm == MINUS_ONE_ONE:
    return MINUS_ONE_ONE
  try:
    mean, std = (tuple(float(v) for v in part) for part in norm)
  except (TypeError, ValueError):
    raise ValueError(f"normalization must be {MINUS_ONE_ONE!r} or (mean, std) of 3 floats "
                     f"each, got {norm!r}") from None
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f'normalization (mean, std) needs 3 values each and std > 0, got {norm!r}')
  if mean == (0.5,) * 3 and std == (0.5,) * 3:
    return MINUS_ONE_ONE
  return (mean, std)
