"""BiT ResNet-v2: pre-activation bottlenecks, weight-standardized convs and GroupNorm.

Follows big_transfer (`bit_jax/models.py`, `bit_tf2/models.py`) and docs/method.md#checkpoint-formats. Module and
parameter names equal the keys of the official `BiT-{S,M}-R*.npz` files, so a file maps onto the
param tree by name:

  resnet/root_block/standardized_conv2d/kernel            (7, 7, 3, 64w)
  resnet/block{s}/unit{uu}/{a,b,c}/group_norm/{gamma,beta}
  resnet/block{s}/unit{uu}/{a,b,c}/standardized_conv2d/kernel
  resnet/block{s}/unit01/a/proj/standardized_conv2d/kernel (projection units only)
  resnet/group_norm/{gamma,beta}                          (pre-head norm)
  resnet/head/conv2d/{kernel (1, 1, 2048w, C), bias (C)}

Unit (pre-activation, stride on the 3x3 conv):
  y = ReLU(GN_a(x)); shortcut = proj(y) if the shape changes else x
  y = conv_a(y); y = conv_b(ReLU(GN_b(y))); y = conv_c(ReLU(GN_c(y))); return y + shortcut.

`ResNetV2(...)(images)` returns `(logits, out)`; `out` holds the named representations of
docs/method.md#layer-names in forward order ('root/conv', 'root', 'block1/unit01/preact_a', ..., 'logits').
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_analysis.models import layers

Array = jax.Array

# Stage s (1-based) has bottleneck width `width * width_factor * 2**(s-1)` and outputs 4x that.
_STAGE_STRIDES = (1, 2, 2, 2)


def standardize(x: Array, axis: Sequence[int], eps: float) -> Array:
  """(x - mean) / sqrt(var + eps) over `axis` (BiT's `standardize`, biased variance)."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def _fan_in_normal(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """N(0, 1/fan_in). The scale is immaterial to the forward pass (the kernel is standardized);
  a plain normal traces ~2x faster than the truncated-normal initialisers (eval_shape of R152)."""
  fan_in = shape[0] * shape[1] * shape[2]
  return jax.random.normal(key, shape, dtype) * (1.0 / fan_in)**0.5


class StdConv(nn.Module):
  """Bias-free conv whose kernel is standardized per output channel over (H, W, C_in).

  BiT uses eps = 1e-10 *inside* the square root (big_transfer); vit_jax's hybrid stem differs
  (std + 1e-5) and lives in hybrid.py.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)) padding; BiT pads symmetrically
      (`fixed_padding`) and convolves VALID, which differs from XLA's 'SAME' for stride 2.
    eps: added to the variance inside the square root.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  eps: float = 1e-10

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [b, h, w, c_in] -> [b, h', w', features]."""
    kernel = self.param('kernel', _fan_in_normal,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    kernel = standardize(kernel, axis=(0, 1, 2), eps=self.eps)
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=self.strides, padding=self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class GroupNorm(nn.Module):
  """GroupNorm with BiT's parameter names (`gamma`, `beta`, shape (C,)) and eps 1e-5.

  Statistics are over (H, W, channels of the group), per example; eps sits inside the sqrt.
  """
  num_groups: int = 32
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [b, h, w, c] -> [b, h, w, c]; c must be divisible by num_groups."""
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels not divisible by {self.num_groups} groups '
                       f'(input shape {x.shape}).')
    gamma = self.param('gamma', nn.initializers.ones, (c,), jnp.float32)
    beta = self.param('beta', nn.initializers.zeros, (c,), jnp.float32)
    grouped = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    grouped = standardize(grouped, axis=(1, 2, 4), eps=self.eps)
    return grouped.reshape(x.shape) * gamma.reshape(1, 1, 1, c) + beta.reshape(1, 1, 1, c)


class _ProjConv(nn.Module):
  """Scope `proj/standardized_conv2d` of the official files (1x1, strided shortcut)."""
  features: int
  strides: tuple[int, int]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return StdConv(self.features, strides=self.strides, name='standardized_conv2d')(x)


class PreActConv(nn.Module):
  """One of a unit's `a`, `b`, `c` scopes: GroupNorm -> ReLU -> [proj] -> std conv.

  Attributes:
    features: conv output channels.
    kernel_size: 1 or 3 (3 is padded by 1 on each side, as BiT's fixed_padding).
    strides: conv stride (only `b` and `proj` stride in BiT-v2).
    num_groups: GroupNorm groups.
    proj_features: if set, also computes the projection shortcut from the pre-activated input.
    proj_strides: stride of the projection.
  """
  features: int
  kernel_size: int = 1
  strides: int = 1
  num_groups: int = 32
  proj_features: int | None = None
  proj_strides: int = 1

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array | None, Array]:
    """x: [b, h, w, c] -> (preact [b, h, w, c], proj or None, conv [b, h', w', features])."""
    preact = nn.relu(GroupNorm(self.num_groups, name='group_norm')(x))
    proj = None
    if self.proj_features is not None:
      proj = _ProjConv(self.proj_features, (self.proj_strides,) * 2, name='proj')(preact)
    p = (self.kernel_size - 1) // 2
    y = StdConv(self.features, (self.kernel_size,) * 2, (self.strides,) * 2,
                padding=((p, p), (p, p)), name='standardized_conv2d')(preact)
    return preact, proj, y


class BottleneckUnit(nn.Module):
  """Pre-activation bottleneck (docs/method.md#checkpoint-formats). Output channels are 4 * `features`."""
  features: int
  strides: int = 1
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """x: [b, h, w, c_in] -> ([b, h/s, w/s, 4*features], {name: representation})."""
    out = {}
    c_out = 4 * self.features
    needs_proj = x.shape[-1] != c_out or self.strides != 1
    out['preact_a'], proj, y = PreActConv(
        self.features, 1, 1, self.num_groups, proj_features=c_out if needs_proj else None,
        proj_strides=self.strides, name='a')(x)
    if needs_proj:
      out['proj'] = proj
    shortcut = proj if needs_proj else x
    out['conv_a'] = y
    out['preact_b'], _, y = PreActConv(self.features, 3, self.strides, self.num_groups,
                                       name='b')(y)
    out['conv_b'] = y
    out['preact_c'], _, y = PreActConv(c_out, 1, 1, self.num_groups, name='c')(y)
    out['conv_c'] = y
    return y + shortcut, out


class _HeadConv(nn.Module):
  """Scope `head/conv2d`: the official head is a 1x1 conv on the pooled [b, 1, 1, c] map."""
  num_classes: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [b, c] -> [b, num_classes]. Zero init, as BiT and vit_jax heads."""
    kernel = self.param('kernel', nn.initializers.zeros, (1, 1, x.shape[-1], self.num_classes),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
    return x @ kernel[0, 0] + bias[None, :]


class _Head(nn.Module):
  """Scope `head`."""
  num_classes: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _HeadConv(self.num_classes, name='conv2d')(x)


class _RootConv(nn.Module):
  """Scope `root_block/standardized_conv2d`: BiT's 7x7/2 conv (or the small 3x3/1 stem)."""
  features: int
  kernel_size: int
  strides: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # BiT's fixed_padding: (k - 1) // 2 before, the rest after, then a VALID conv.
    lo = (self.kernel_size - 1) // 2
    hi = self.kernel_size - 1 - lo
    return StdConv(self.features, (self.kernel_size,) * 2, (self.strides,) * 2,
                   padding=((lo, hi), (lo, hi)), name='standardized_conv2d')(x)


class Stage(nn.Module):
  """Scope `block{s}`: `units` bottlenecks named unit01, unit02, ...; the first one strides.

  `stage` (1-based) only names the outputs ('block{s}/unit{uu}/...', see vit_analysis/models/layers.py).
  """
  units: int
  features: int
  strides: int
  num_groups: int = 32
  stage: int = 1

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """x: [b, h, w, c] -> ([b, h/s, w/s, 4*features], {'block1/unit01/preact_a': ..., ...})."""
    out = {}
    for u in range(1, self.units + 1):
      # Parameter scope 'unit01' as in the BiT files; output names from vit_analysis.models.layers.
      x, unit_out = BottleneckUnit(self.features, self.strides if u == 1 else 1,
                                   self.num_groups, name=f'unit{u:02d}')(x)
      out.update({layers.unit(self.stage, u, k): v for k, v in unit_out.items()})
      out[layers.unit(self.stage, u)] = x
    return x, out


class _ResNetBody(nn.Module):
  """The `resnet/` scope of the official files; see `ResNetV2` for the attributes."""
  num_classes: int | None
  block_units: tuple[int, ...]
  width: int
  width_factor: int
  small_stem: bool
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    out = {}
    root_width = self.width * self.width_factor
    if self.small_stem:
      # 28-32 px inputs: keep the resolution (3x3 stride-1 conv, no pool); 'root' == 'root/conv'.
      x = out['root/conv'] = _RootConv(root_width, 3, 1, name='root_block')(x)
    else:
      x = out['root/conv'] = _RootConv(root_width, 7, 2, name='root_block')(x)
      # BiT pads with zeros (not -inf) before the VALID 3x3/2 max-pool.
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    out['root'] = x
    for s, units in enumerate(self.block_units, start=1):
      x, stage_out = Stage(units, root_width * 2**(s - 1), 1 if s == 1 else 2, self.num_groups,
                           stage=s, name=f'block{s}')(x)
      out.update(stage_out)
    x = out['head_norm'] = nn.relu(GroupNorm(self.num_groups, name='group_norm')(x))
    x = out['pre_logits'] = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = _Head(self.num_classes, name='head')(x)
    out['logits'] = x
    return x, out


class ResNetV2(nn.Module):
  """BiT ResNet-v2 classifier; all parameters live under the `resnet/` scope.

  Attributes:
    num_classes: head size; 0/None gives no head (logits = pre_logits).
    block_units: bottleneck units per stage, e.g. (3, 4, 6, 3) for R50.
    width_factor: the `x` of R50x3; root width is `width * width_factor`.
    width: base width (64 in every BiT model; smaller for the CPU variants).
    small_stem: 3x3 stride-1 root conv without max-pool, for 28-32 px images.
    num_groups: GroupNorm groups (32 in BiT).
    image_size: default input size, used only to build param shapes (checkpoint loading).
  """
  num_classes: int | None
  block_units: tuple[int, ...] = (3, 4, 6, 3)
  width_factor: int = 1
  width: int = 64
  small_stem: bool = False
  num_groups: int = 32
  image_size: int = 224

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, dict[str, Any]]:
    """Classifies images.

    Args:
      images: [b, h, w, c] float, NHWC, in [-1, 1].
      train: unused (no dropout or batch statistics); kept for the common model signature.

    Returns:
      logits [b, num_classes] and `out`, the named representations in forward order.
    """
    del train
    if images.ndim != 4:
      raise ValueError(f'ResNetV2 expects NHWC images [b, h, w, c], got shape {images.shape}.')
    if self.num_classes is not None and self.num_classes < 0:
      raise ValueError(f'num_classes must be >= 0 or None, got {self.num_classes}.')
    return _ResNetBody(self.num_classes, tuple(self.block_units), self.width,
                       self.width_factor, self.small_stem, self.num_groups, name='resnet')(images)


def _bit(units: tuple[int, ...], wf: int) -> dict[str, Any]:
  return {'block_units': units, 'width_factor': wf}


_R26, _R50, _R101, _R152 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)

# name -> ResNetV2 constructor kwargs (without num_classes); merged into models.create_model.
VARIANTS: dict[str, dict[str, Any]] = {
    'R26x1': _bit(_R26, 1),
    'R50x1': _bit(_R50, 1),
    'R50x3': _bit(_R50, 3),
    'R101x1': _bit(_R101, 1),
    'R101x3': _bit(_R101, 3),
    'R152x2': _bit(_R152, 2),
    'R152x4': _bit(_R152, 4),
    # CPU variants for 28-32 px inputs (small stem: 32 px -> 32, 16, 8, 4 per stage).
    'R26x1-small': {'block_units': _R26, 'small_stem': True, 'image_size': 32},
    # Demo: stage widths 16..128 (outputs 64..512), 0.88M params (ViT-demo_4 scale).
    'R-demo': {'block_units': _R26, 'width': 16, 'num_groups': 8, 'small_stem': True,
               'image_size': 32},
    # Smoke: one unit per stage, outputs 32..256 channels; compiles in about a second.
    'R-smoke': {'block_units': (1, 1, 1, 1), 'width': 8, 'num_groups': 4, 'small_stem': True,
                'image_size': 32},
}
MODEL_CLASS = ResNetV2
