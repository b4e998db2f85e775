"""timm's `VisionTransformer` architectures as `VisionTransformer` options: `timm:<model name>`.

`create_model('timm:vit_base_patch14_reg4_dinov2.lvd142m', num_classes=0)` builds the project's
ViT with the options of timm's architecture of that name; weights in timm's layout are loaded by
`checkpoints.load_safetensors`. As in timm, the tag after the dot names the weights, not the
architecture: any tag parses, and it only selects the input normalisation (timm's pretrained
config `mean` / `std` for the known tags; the family's usual one otherwise, or pass
`normalization=` to override).

What each timm architecture means (timm `vision_transformer.py` / `deit.py` model functions):
  * all: fused qkv with bias, exact-erf GELU (torch `nn.GELU`), LayerNorm eps 1e-6 (timm's
    `LayerNorm` default), CLS token, position embedding over [CLS, grid], token pooling;
  * `*_dinov2`: patch 14 at 518 px, LayerScale initialised at 1e-5; `*_reg4_dinov2` adds 4
    register tokens after the CLS token with `no_embed_class=True` (the position embedding
    covers the grid only and is added before the prefix tokens are concatenated);
  * `*_clip_*`: `pre_norm` (LayerNorm before the blocks), no patch-embedding bias, LayerNorm eps
    1e-5; `*_clip_quickgelu_*` use QuickGELU (OpenAI's original activation);
  * `deit_*`: the plain ViT sizes (not the distilled `deit_*_distilled_*`, whose extra token
    and second head are not supported).
"""
from __future__ import annotations

import difflib
import re
from typing import Any

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
MINUS_ONE_ONE = 'minus_one_one'  # timm's IMAGENET_INCEPTION mean = std = 0.5.

# size -> (embed_dim, depth, num_heads); mlp_ratio 4 everywhere here.
_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12),
          'large': (1024, 24, 16), 'huge': (1280, 32, 16)}
# The architectures timm registers under these names (checked against timm's model functions).
_PLAIN = {f'vit_{s}_patch{p}_{r}' for s, p, r in [
    ('tiny', 16, 224), ('tiny', 16, 384), ('small', 32, 224), ('small', 32, 384),
    ('small', 16, 224), ('small', 16, 384), ('small', 8, 224), ('base', 32, 224),
    ('base', 32, 384), ('base', 16, 224), ('base', 16, 384), ('base', 8, 224),
    ('large', 32, 224), ('large', 32, 384), ('large', 16, 224), ('large', 16, 384),
    ('large', 14, 224), ('huge', 14, 224)]}
_DINOV2 = {f'vit_{s}_patch14{r}_dinov2' for s in ('small', 'base', 'large') for r in ('', '_reg4')}
_CLIP = {f'vit_{s}_patch{p}_clip{q}_224' for s, p in [('base', 32), ('base', 16), ('large', 14)]
         for q in ('', '_quickgelu')}
_DEIT = {f'deit_{s}_patch16_224' for s in ('tiny', 'small', 'base')}
ARCHITECTURES: tuple[str, ...] = tuple(sorted(_PLAIN | _DINOV2 | _CLIP | _DEIT))

_NAME = re.compile(r'^(?:vit|deit)_(tiny|small|base|large|huge)_patch(\d+)')


def _normalization(arch: str, tag: str) -> Any:
  """timm's pretrained-config mean / std of `arch.tag`, as `ModelInfo.normalization`."""
  if arch in _DEIT or arch in _DINOV2:
    return IMAGENET
  if arch in _CLIP:
    # timm's LAION-2B ViT-L/14 configs use the inception (= [-1, 1]) statistics.
    if arch.startswith('vit_large_patch14_clip') and tag.startswith('laion2b'):
      return MINUS_ONE_ONE
    return OPENAI_CLIP
  if tag.split('_')[0] in ('dino', 'mae'):
    return IMAGENET
  return MINUS_ONE_ONE  # augreg / orig (the vit_jax weights) and timm's default config.


def split_name(name: str) -> tuple[str, str]:
  """'timm:vit_base_patch16_224.dino' -> ('vit_base_patch16_224', 'dino'); the tag may be ''."""
  body = name.removeprefix('timm:')
  arch, _, tag = body.partition('.')
  return arch, tag


def config(name: str) -> dict[str, Any]:
  """`VisionTransformer` constructor kwargs (without num_classes) of a timm model name.

  Args:
    name: 'timm:<architecture>[.<tag>]', e.g. 'timm:vit_base_patch16_224.mae'.

  Raises:
    KeyError: an architecture this module does not define (close matches listed).
  """
  arch, tag = split_name(name)
  if arch not in ARCHITECTURES:
    close = difflib.get_close_matches(arch, ARCHITECTURES, n=5, cutoff=0.5)
    raise KeyError(f'unknown timm architecture {arch!r} (from {name!r}); close matches: '
                   f'{close}; supported: {list(ARCHITECTURES)}')
  size, patch = _NAME.match(arch).groups()
  width, depth, heads = _SIZES[size]
  kwargs: dict[str, Any] = {
      'patch_size': int(patch), 'hidden_size': width, 'num_layers': depth,
      'mlp_dim': 4 * width, 'num_heads': heads, 'classifier': 'token',
      'image_size': 384 if arch.endswith('_384') else 224, 'mlp_activation': 'gelu',
      'ln_eps': 1e-6, 'normalization': _normalization(arch, tag)}
  if arch in _DINOV2:
    kwargs.update(image_size=518, layerscale_init=1e-5)
    if '_reg4_' in arch:
      kwargs.update(num_registers=4, posemb_prefix=False)
  if arch in _CLIP:
    kwargs.update(pre_norm=True, embedding_bias=False, ln_eps=1e-5)
    if '_quickgelu_' in arch:
      kwargs.update(mlp_activation='quick_gelu')
  return kwargs
