"""big_vision's ViT (`big_vision/models/vit.py`) as `VisionTransformer` options: `big_vision:B/16`.

`create_model('big_vision:So400m/14', num_classes=0, pool_type='map', image_size=224)` builds the
project's ViT the way big_vision's `Model(variant=..., pool_type=..., posemb=...)` does:
  * the position embedding covers the patch grid only and is added before the CLS token (if any)
    is concatenated (`posemb_prefix=False`); 'learn' or 'sincos2d' (fixed, not a parameter);
  * pool_type 'tok' (CLS token, token pooling), 'gap' (mean over the tokens) or 'map' (attention
    pooling, `MAPHead`); `rep_size` adds the Dense+tanh `pre_logits` layer;
  * tanh-approximate GELU and LayerNorm eps 1e-6 (Flax defaults), inputs in [-1, 1].
The parameters take vit_jax's names; `checkpoints.load_npz` renames big_vision's (linen-numbered
`MlpBlock_0`, `LayerNorm_1`, scanned blocks, `params/img/` prefixes) on the way in.
"""
from __future__ import annotations

import difflib
from typing import Any

# variant -> (width, depth, mlp_dim, num_heads): Table 2 of "Scaling Vision Transformers"
# (arXiv:2106.04560) and SoViT-400m (arXiv:2305.13035), as big_vision's `decode_variant`.
SIZES: dict[str, tuple[int, int, int, int]] = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'So400m': (1152, 27, 4304, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
    'e': (1792, 56, 15360, 16),
}
POOL_TYPES = {'tok': 'token', 'gap': 'gap', 'map': 'map'}
OPTIONS = ('pool_type', 'posemb', 'rep_size')


def config(name: str, pool_type: str = 'gap', posemb: str = 'learn',
           rep_size: int | bool = False) -> dict[str, Any]:
  """`VisionTransformer` kwargs (without num_classes) of 'big_vision:<size>/<patch>'.

  Args:
    name: e.g. 'big_vision:B/16' or 'big_vision:So400m/14'.
    pool_type: big_vision's 'tok' | 'gap' (its default) | 'map' ('token' is read as 'tok').
    posemb: 'learn' | 'sincos2d'.
    rep_size: False, True (width) or an int: the Dense+tanh pre_logits layer.

  Raises:
    KeyError / ValueError: unknown variant, missing patch size, unknown pool type or posemb.
  """
  variant = name.removeprefix('big_vision:')
  size, sep, patch = variant.partition('/')
  if size not in SIZES:
    close = difflib.get_close_matches(size, SIZES, n=3, cutoff=0.3)
    raise KeyError(f'unknown big_vision variant {variant!r}; close matches: {close}; sizes: '
                   f'{list(SIZES)} (written as "<size>/<patch>", e.g. "B/16")')
  if not sep or not patch.isdigit():
    raise ValueError(f'big_vision variant {variant!r} needs a patch size, e.g. "{size}/16"')
  pool = 'tok' if pool_type == 'token' else pool_type
  if pool not in POOL_TYPES:
    raise ValueError(f'pool_type must be one of {sorted(POOL_TYPES)}, got {pool_type!r}')
  if posemb not in ('learn', 'sincos2d'):
    raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {posemb!r}")
  width, depth, mlp, heads = SIZES[size]
  representation = (width if rep_size is True else int(rep_size)) if rep_size else None
  return {'patch_size': int(patch), 'hidden_size': width, 'num_layers': depth, 'mlp_dim': mlp,
          'num_heads': heads, 'classifier': POOL_TYPES[pool], 'posemb': posemb,
          'posemb_prefix': False, 'representation_size': representation, 'image_size': 224,
          'normalization': 'minus_one_one'}
