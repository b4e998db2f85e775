"""Model registry: `create_model('ViT-B_16', num_classes=1000)` with vit_jax spellings.

Each model module exposes `VARIANTS: dict[name, constructor kwargs]` and its module class; the
registry only merges them. Every model is a Flax linen module with
`apply({'params': params}, images, train=False) -> (logits, out)`, images NHWC float32 in [-1, 1],
`out` the dict of named representations in forward order (see vit_analysis.models.capture).
"""
import dataclasses
import difflib
from typing import Any

import flax.linen as nn

from vit_analysis.models import big_vision_vit, hybrid, mixer, resnet, timm_vit, vit
from vit_analysis.models.hybrid import HybridViT
from vit_analysis.models.info import ModelInfo, describe
from vit_analysis.models.mixer import MlpMixer
from vit_analysis.models.resnet import ResNetV2
from vit_analysis.models.vit import VisionTransformer

# name -> (module class, constructor kwargs), filled from every family below.
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def _register(cls: type[nn.Module], variants: dict[str, dict[str, Any]]) -> None:
  for name, kwargs in variants.items():
    if name in _REGISTRY:
      raise ValueError(f'model name {name!r} registered twice')
    _REGISTRY[name] = (cls, kwargs)


_register(VisionTransformer, vit.VARIANTS)
_register(MlpMixer, mixer.VARIANTS)
_register(ResNetV2, resnet.VARIANTS)
_register(HybridViT, hybrid.VARIANTS)


def model_names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def create_model(name: str, num_classes: int | None, **overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: vit_jax spelling, e.g. 'ViT-B_16', 'ViT-B_32-gap-norep', 'Mixer-B_16', 'R50x1', or a
      small CPU variant ('ViT-demo_4', 'ViT-smoke_8', 'Mixer-smoke_8', 'R26x1-small', ...);
      'timm:<timm model name>' (e.g. 'timm:vit_base_patch14_reg4_dinov2.lvd142m', see
      models.timm_vit); 'big_vision:<variant>' (e.g. 'big_vision:B/16', see
      models.big_vision_vit; takes pool_type=, posemb=, rep_size= overrides).
    num_classes: width of the head (0/None: no head).
    **overrides: constructor fields to change, e.g. image_size=384, skip_removed=(3, 4),
      classifier='gap', representation_size=768.

  Returns:
    An unbound flax.linen Module.

  Raises:
    KeyError: unknown name (the message lists close and all known names) or unknown override.
  """
  if name.startswith('timm:'):
    cls, kwargs = VisionTransformer, timm_vit.config(name)
  elif name.startswith('big_vision:'):
    options = {k: overrides.pop(k) for k in big_vision_vit.OPTIONS if k in overrides}
    cls, kwargs = VisionTransformer, big_vision_vit.config(name, **options)
  elif name in _REGISTRY:
    cls, kwargs = _REGISTRY[name]
  else:
    close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
    raise KeyError(f'unknown model {name!r}; close matches: {close}; '
                   f"known models: {model_names()}, 'timm:<name>' ({len(timm_vit.ARCHITECTURES)} "
                   "architectures) and 'big_vision:<size>/<patch>'")
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise KeyError(f'unknown overrides {unknown} for {name!r} ({cls.__name__}); '
                   f'valid fields: {sorted(fields)}')
  # Lists (e.g. from configs) become tuples so that modules stay hashable (capture caches on them).
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return cls(**{**kwargs, 'num_classes': num_classes, **overrides})


__all__ = ['HybridViT', 'MlpMixer', 'ModelInfo', 'ResNetV2', 'VisionTransformer', 'create_model',
           'describe', 'model_names']
