"""Model families (ViT, BiT ResNet, hybrid, Mixer), their description, layer names and capture.

`create_model`, `model_names` (models/registry.py) and `describe`, `ModelInfo` (models/info.py)
are the public names. They load on first use: `models.layers` (layer-name grammar, no JAX) is
read by the report, which must stay importable without JAX and Flax (docs/modules.md).
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    'create_model': 'registry', 'model_names': 'registry', 'describe': 'info', 'ModelInfo': 'info',
    'VisionTransformer': 'vit', 'ResNetV2': 'resnet', 'MlpMixer': 'mixer', 'HybridViT': 'hybrid',
}


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    return getattr(importlib.import_module(f'vit_analysis.models.{_PUBLIC[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = sorted(_PUBLIC)
