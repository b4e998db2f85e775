"""big_vision ViT npz layouts -> the vit_jax names the project's ViT uses.

big_vision (`big_vision/models/vit.py`) is written in linen from the start, so its encoder
blocks number their children per type: `LayerNorm_0`, `MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`, where vit_jax's pre-linen files (and this project) have
`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`. Besides:
  * two-tower exports (SigLIP, LiT) keep the image tower under `params/img/`, single-tower
    exports under `params/`;
  * `scan=True` models store one `Transformer/encoderblock/...` array per parameter with a
    leading depth axis instead of `encoderblock_{i}`;
  * the learned position embedding is a top-level `pos_embedding` (grid only), absent for
    `posemb='sincos2d'`;
  * `MAPHead_0/...` (probe, attention, LayerNorm, MLP) keeps big_vision's names in the model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from vit_analysis.models import big_vision_vit

_PREFIXES = ('params/img/', 'params/')
_LINEN_TO_PRELINEN = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3'}
_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)/(.*)$')
_SCANNED = 'Transformer/encoderblock/'


def is_big_vision(flat: Mapping[str, np.ndarray]) -> bool:
  """Whether the keys are in one of big_vision's layouts (not vit_jax's)."""
  return any(k.startswith(_PREFIXES) or k.startswith(_SCANNED) or k == 'pos_embedding'
             or re.match(r'^Transformer/encoderblock_\d+/MlpBlock_0/', k) for k in flat)


def to_vit_jax(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a big_vision ViT's flat params to the project's (vit_jax) names.

  Args:
    flat: {'/'-joined key: array} as read from the npz.

  Returns:
    A new flat dict: prefix stripped, scanned blocks unstacked to `encoderblock_{i}`, block
    children renamed to pre-linen numbering, `pos_embedding` moved under `Transformer/`.

  Raises:
    ValueError: both prefixed and unprefixed keys, or scanned arrays of unequal depth.
  """
  prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in flat)), '')
  if prefix:
    if prefix == 'params/img/':
      # Only the image tower: a two-tower file also holds 'params/txt/...' and 't', 'b'.
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    else:
      stray = sorted(k for k in flat if not k.startswith(prefix))
      if stray:
        raise ValueError(f'checkpoint mixes {prefix!r}-prefixed keys with others: {stray[:5]}')
      flat = {k[len(prefix):]: v for k, v in flat.items()}
  out: dict[str, np.ndarray] = {}
  scanned = {k: v for k, v in flat.items() if k.startswith(_SCANNED)}
  depths = {v.shape[0] for v in scanned.values()}
  if len(depths) > 1:
    raise ValueError(f'scanned encoder arrays disagree on the depth axis: {sorted(depths)}')
  for k, v in scanned.items():
    for i in range(v.shape[0]):
      out[f'Transformer/encoderblock_{i}/{k[len(_SCANNED):]}'] = v[i]
  out.update({k: v for k, v in flat.items() if not k.startswith(_SCANNED)})
  linen = any(re.match(r'^Transformer/encoderblock_\d+/MlpBlock_0/', k) for k in out)
  renamed = {}
  for k, v in out.items():
    m = _BLOCK.match(k)
    if linen and m and m.group(2) in _LINEN_TO_PRELINEN:
      k = f'Transformer/encoderblock_{m.group(1)}/{_LINEN_TO_PRELINEN[m.group(2)]}/{m.group(3)}'
    elif k == 'pos_embedding':
      k = 'Transformer/posembed_input/pos_embedding'
    renamed[k] = v
  return renamed


def describe_flat(flat: Mapping[str, np.ndarray]) -> dict[str, object]:
  """Variant and options of a big_vision ViT from its (renamed, `to_vit_jax`) params.

  Returns:
    {'name': 'big_vision:<size>/<patch>', 'pool_type': 'tok' | 'gap' | 'map', 'posemb':
     'learn' | 'sincos2d', 'representation_size': int or None, 'image_size': int or None}.

  Raises:
    ValueError: no patch embedding, or a width / depth none of big_vision's sizes has.
  """
  if 'embedding/kernel' not in flat:
    raise ValueError(f'no embedding/kernel: not a ViT; first keys {sorted(flat)[:6]}')
  kernel = flat['embedding/kernel']
  patch, width = int(kernel.shape[0]), int(kernel.shape[-1])
  depth = len({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')})
  sizes = [s for s, (w, d, _, _) in big_vision_vit.SIZES.items() if (w, d) == (width, depth)]
  if not sizes:
    raise ValueError(f'no big_vision size has width {width} and depth {depth}')
  posemb = flat.get('Transformer/posembed_input/pos_embedding')
  pre = flat.get('pre_logits/kernel')
  return {
      'name': f'big_vision:{sizes[0]}/{patch}',
      'pool_type': 'map' if 'MAPHead_0/probe' in flat else 'tok' if 'cls' in flat else 'gap',
      'posemb': 'sincos2d' if posemb is None else 'learn',
      'representation_size': None if pre is None else int(pre.shape[-1]),
      # The grid is square in every big_vision release; None when the embedding is fixed.
      'image_size': None if posemb is None else int(np.sqrt(posemb.shape[1])) * patch}
