"""Hybrid ResNet + ViT (vit_jax `R50+ViT-B_16`): a truncated v1-style ResNet, then a ViT encoder.

The backbone is vit_jax `models_resnet.py`, which differs from BiT (resnet.py) on purpose:
  * post-activation units: conv1 -> GN -> ReLU -> conv2 (stride, 'SAME') -> GN -> ReLU -> conv3 ->
    GN (zero-init scale); shortcut conv_proj -> gn_proj when the shape changes; ReLU after the add;
  * weight standardization divides by (std + 1e-5), not sqrt(var + 1e-10);
  * Flax `nn.GroupNorm` (32 groups, eps 1e-6, params `scale`/`bias`);
  * root: 7x7/2 'SAME' conv, GN, ReLU, 3x3/2 'SAME' max-pool (padding with -inf).
Names equal the hybrid npz keys (docs/method.md#checkpoint-formats): `conv_root`, `gn_root`, `block{s}/unit{u}/...`
(units numbered `unit1`, not `unit01`), then `embedding` (a 1x1 conv for R50+ViT-B_16), `cls`,
`Transformer/...`, `pre_logits`, `head` as in the plain ViT.

`out` names: 'resnet/root/conv', 'resnet/root', 'resnet/block{s}/unit{uu}' (2-digit, as resnet.py;
prefixed so that a 'block*' glob selects only the transformer blocks), then the ViT names
('embedding', 'block00/ln0', ..., 'encoder_norm', 'pre_logits', 'logits').
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_analysis.models import layers, vit

Array = jax.Array


class StdConv(nn.Conv):
  """vit_jax's StdConv: kernel (w - mean) / (std + 1e-5) over (H, W, C_in) per output channel."""

  def param(self, name: str, *args, **kwargs) -> Any:
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = param - jnp.mean(param, axis=(0, 1, 2), keepdims=True)
      param = param / (jnp.std(param, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return param


class ResidualUnit(nn.Module):
  """vit_jax's post-activation bottleneck; output channels 4 * `features`."""
  features: int
  strides: int = 1
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [b, h, w, c] -> [b, h/s, w/s, 4*features]."""
    conv = lambda f, k, s, name: StdConv(f, (k, k), (s, s), use_bias=False, name=name)
    gn = lambda name, **kw: nn.GroupNorm(self.num_groups, epsilon=1e-6, name=name, **kw)
    residual = x
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      residual = gn('gn_proj')(conv(4 * self.features, 1, self.strides, 'conv_proj')(x))
    y = nn.relu(gn('gn1')(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(gn('gn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
    y = gn('gn3', scale_init=nn.initializers.zeros)(conv(4 * self.features, 1, 1, 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """Scope `block{s}`: units `unit1`, `unit2`, ...; the first one carries the stride.

  `stage` (1-based) only names the outputs ('block{s}/unit{uu}', see vit_analysis/models/layers.py).
  """
  units: int
  features: int
  strides: int
  num_groups: int = 32
  stage: int = 1

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    out = {}
    for u in range(1, self.units + 1):
      x = ResidualUnit(self.features, self.strides if u == 1 else 1, self.num_groups,
                       name=f'unit{u}')(x)
      out[layers.unit(self.stage, u)] = x
    return x, out


class HybridViT(nn.Module):
  """ResNet backbone (vit_jax v1 style) + ViT; vit_jax `VisionTransformer` with `resnet` set.

  Attributes:
    num_classes: head width; 0/None gives no head.
    resnet_units: units per backbone stage, e.g. (3, 4, 9) for R50+ViT-B_16 (stage s halves the
      resolution for s > 1; the root divides it by 4).
    resnet_width_factor: root width = 64 * factor.
    patch_size: pixels per token (backbone stride x embedding patch), 16 for R50+ViT-B_16. It is
      what analyses need (attention distances in pixels); the embedding conv uses
      patch_size // backbone stride on the feature map.
    hidden_size, mlp_dim, num_heads, num_layers, classifier, representation_size, image_size,
    dropout_rate, attention_dropout_rate, skip_removed, head_bias_init, precision: as ViT.
    resnet_num_groups: GroupNorm groups (32 in vit_jax; smaller only for tiny test models).
  """
  num_classes: int | None
  resnet_units: tuple[int, ...]
  hidden_size: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  patch_size: int = 16
  resnet_width_factor: int = 1
  classifier: str = 'token'
  representation_size: int | None = None
  image_size: int = 224
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip_removed: tuple[int, ...] = ()
  head_bias_init: float = 0.0
  precision: Any = None
  resnet_num_groups: int = 32

  @property
  def backbone_stride(self) -> int:
    return 4 * 2**max(len(self.resnet_units) - 1, 0)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """images: [b, h, w, c] in [-1, 1] -> (logits [b, num_classes], out in forward order)."""
    if images.ndim != 4:
      raise ValueError(f'images must be [b, h, w, c], got shape {images.shape}')
    if self.classifier not in ('token', 'gap'):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    vit.check_token_options(self)
    if self.patch_size % self.backbone_stride:
      raise ValueError(f'patch_size {self.patch_size} is not a multiple of the backbone stride '
                       f'{self.backbone_stride}')
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch size '
                       f'{self.patch_size}')
    out = {}
    width = 64 * self.resnet_width_factor
    x = StdConv(width, (7, 7), (2, 2), use_bias=False, name='conv_root')(images)
    out['resnet/root/conv'] = x
    x = nn.relu(nn.GroupNorm(self.resnet_num_groups, epsilon=1e-6, name='gn_root')(x))
    x = out['resnet/root'] = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for s, units in enumerate(self.resnet_units, start=1):
      x, stage_out = ResNetStage(units, width * 2**(s - 1), 1 if s == 1 else 2,
                                 self.resnet_num_groups, stage=s, name=f'block{s}')(x)
      out.update({f'resnet/{k}': v for k, v in stage_out.items()})
    p = self.patch_size // self.backbone_stride
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                precision=self.precision, name='embedding')(x)
    n, h, w, c = x.shape
    # The ViT's token pipeline (CLS, encoder, pooling, pre_logits, head), with vit_jax's options.
    logits, vit_out = vit.encode_and_classify(self, jnp.reshape(x, (n, h * w, c)), (h, w),
                                              train=train)
    out.update(vit_out)
    return logits, out


_B = {'hidden_size': 768, 'mlp_dim': 3072, 'num_heads': 12, 'num_layers': 12}
_L = {'hidden_size': 1024, 'mlp_dim': 4096, 'num_heads': 16, 'num_layers': 24,
      'dropout_rate': 0.1}

# name -> HybridViT kwargs (vit_jax configs/models.py); merged into models.create_model.
VARIANTS: dict[str, dict[str, Any]] = {
    'R50+ViT-B_16': dict(resnet_units=(3, 4, 9), patch_size=16, **_B),
    'R26+ViT-B_32': dict(resnet_units=(2, 2, 2, 2), patch_size=32, **_B),
    'R50+ViT-L_32': dict(resnet_units=(3, 4, 6, 3), patch_size=32, **_L),
}
MODEL_CLASS = HybridViT
