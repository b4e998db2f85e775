"""big_vision ViT npz files (AugReg, SigLIP image towers) -> ViT, against float64 NumPy.

The files are written here from big_vision's linen names (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`, scanned `Transformer/encoderblock/...`, top-level `pos_embedding`,
`MAPHead_0/...`), and the reference re-implements big_vision's `_Model.__call__` in float64.
"""
import numpy as np
import pytest

from vit_analysis.models import capture, checkpoints, create_model, describe, vit_blocks

D, H, MLP, L, C = 32, 2, 64, 2, 5


def _mha(rng, w):
  hd = D // H
  return {'query/kernel': w(D, H, hd), 'query/bias': w(H, hd), 'key/kernel': w(D, H, hd),
          'key/bias': w(H, hd), 'value/kernel': w(D, H, hd), 'value/bias': w(H, hd),
          'out/kernel': w(H, hd, D), 'out/bias': w(D)}


def bv_params(rng, *, patch=8, grid=16, pool='map', posemb='learn', depth=L, mlp=MLP):
  """Unrolled big_vision ViT params, flat, with big_vision's names."""
  w = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  ln = lambda: {'scale': 1 + w(D), 'bias': w(D)}
  p = {'embedding/kernel': w(patch, patch, 3, D), 'embedding/bias': w(D)}
  if posemb == 'learn':
    p['pos_embedding'] = w(1, grid, D)
  if pool == 'tok':
    p['cls'] = w(1, 1, D)
  for i in range(depth):
    b = f'Transformer/encoderblock_{i}'
    p.update({f'{b}/LayerNorm_0/{k}': v for k, v in ln().items()})
    p.update({f'{b}/MultiHeadDotProductAttention_0/{k}': v for k, v in _mha(rng, w).items()})
    p.update({f'{b}/LayerNorm_1/{k}': v for k, v in ln().items()})
    p.update({f'{b}/MlpBlock_0/Dense_0/kernel': w(D, mlp), f'{b}/MlpBlock_0/Dense_0/bias': w(mlp),
              f'{b}/MlpBlock_0/Dense_1/kernel': w(mlp, D), f'{b}/MlpBlock_0/Dense_1/bias': w(D)})
  p.update({f'Transformer/encoder_norm/{k}': v for k, v in ln().items()})
  if pool == 'map':
    p['MAPHead_0/probe'] = w(1, 1, D)
    p.update({f'MAPHead_0/MultiHeadDotProductAttention_0/{k}': v for k, v in _mha(rng, w).items()})
    p.update({f'MAPHead_0/LayerNorm_0/{k}': v for k, v in ln().items()})
    p.update({'MAPHead_0/MlpBlock_0/Dense_0/kernel': w(D, mlp),
              'MAPHead_0/MlpBlock_0/Dense_0/bias': w(mlp),
              'MAPHead_0/MlpBlock_0/Dense_1/kernel': w(mlp, D),
              'MAPHead_0/MlpBlock_0/Dense_1/bias': w(D)})
  p['head/kernel'], p['head/bias'] = w(D, C), w(C)
  return p


def scan(flat, depth=L):
  """big_vision's scan=True layout: one array per block parameter with a leading depth axis."""
  out = {k: v for k, v in flat.items() if not k.startswith('Transformer/encoderblock_')}
  names = {k.split('/', 2)[2] for k in flat if k.startswith('Transformer/encoderblock_')}
  for n in names:
    out[f'Transformer/encoderblock/{n}'] = np.stack(
        [flat[f'Transformer/encoderblock_{i}/{n}'] for i in range(depth)])
  return out


def _ln(x, p, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p[f'{name}/scale'] + p[f'{name}/bias']


def _attention(p, name, q_in, kv_in):
  """Flax MultiHeadDotProductAttention in float64."""
  proj = lambda x, n: np.einsum('btd,dhk->bthk', x, p[f'{name}/{n}/kernel']) + p[f'{name}/{n}/bias']
  q, k, v = proj(q_in, 'query'), proj(kv_in, 'key'), proj(kv_in, 'value')
  logits = np.einsum('bqhk,bthk->bhqt', q / np.sqrt(q.shape[-1]), k)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  heads = np.einsum('bhqt,bthk->bqhk', a, v)
  return np.einsum('bqhk,hkd->bqd', heads, p[f'{name}/out/kernel']) + p[f'{name}/out/bias']


def _mlp(p, name, x):
  h = x @ p[f'{name}/Dense_0/kernel'] + p[f'{name}/Dense_0/bias']
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # Flax's gelu
  return h @ p[f'{name}/Dense_1/kernel'] + p[f'{name}/Dense_1/bias']


def sincos2d(h, w, width, temperature=10_000.):
  """MoCo v3 2-D embedding: [sin(col w_k), cos(col w_k), sin(row w_k), cos(row w_k)]."""
  quarter = width // 4
  omega = temperature ** -(np.arange(quarter) / (quarter - 1))
  rows, cols = np.divmod(np.arange(h * w), w)
  xs, ys = cols[:, None] * omega[None], rows[:, None] * omega[None]
  return np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)], axis=1)[None]


def bv_forward(p, images, *, pool, pos=None):
  """float64 big_vision ViT: (logits, [block outputs])."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(images, np.float64)
  patch = p['embedding/kernel'].shape[0]
  b, hh, ww, _ = x.shape
  gh, gw = hh // patch, ww // patch
  patches = x.reshape(b, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  t = np.einsum('bijuvc,uvcd->bijd', patches, p['embedding/kernel']).reshape(b, gh * gw, D)
  t = t + p['embedding/bias']
  t = t + (pos if pos is not None else p['pos_embedding'])
  if pool == 'tok':
    t = np.concatenate([np.broadcast_to(p['cls'], (b, 1, D)), t], axis=1)
  blocks = []
  for i in range(L):
    n = f'Transformer/encoderblock_{i}'
    y = _ln(t, p, f'{n}/LayerNorm_0')
    t = t + _attention(p, f'{n}/MultiHeadDotProductAttention_0', y, y)
    t = t + _mlp(p, f'{n}/MlpBlock_0', _ln(t, p, f'{n}/LayerNorm_1'))
    blocks.append(t)
  t = _ln(t, p, 'Transformer/encoder_norm')
  if pool == 'map':
    probe = np.broadcast_to(p['MAPHead_0/probe'], (b, 1, D))
    y = _attention(p, 'MAPHead_0/MultiHeadDotProductAttention_0', probe, t)
    pooled = (y + _mlp(p, 'MAPHead_0/MlpBlock_0', _ln(y, p, 'MAPHead_0/LayerNorm_0')))[:, 0]
  else:
    pooled = t[:, 0] if pool == 'tok' else t.mean(1)
  return pooled @ p['head/kernel'] + p['head/bias'], blocks


def _model(pool, posemb='learn', image_size=32):
  return create_model('big_vision:mu/8', C, pool_type=pool, posemb=posemb, hidden_size=D,
                      num_layers=L, num_heads=H, mlp_dim=MLP, image_size=image_size)


# (pool, posemb, layout) with layout: (prefix, scanned, extra two-tower keys)
CASES = {
    'siglip_scanned_map': ('map', 'learn', ('params/img/', True, True)),
    'unrolled_tok_params_prefix': ('tok', 'learn', ('params/', False, False)),
    'gap_sincos2d': ('gap', 'sincos2d', ('', False, False)),
    'scanned_tok_sincos2d': ('tok', 'sincos2d', ('params/img/', True, False)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_big_vision_npz_matches_float64_reference(case, tmp_path):
  pool, posemb, (prefix, scanned, two_tower) = CASES[case]
  rng = np.random.default_rng(len(case))
  p = bv_params(rng, pool=pool, posemb=posemb)
  flat = scan(p) if scanned else dict(p)
  flat = {prefix + k: v for k, v in flat.items()}
  if two_tower:
    flat.update({'params/txt/Encoder_0/x/kernel': np.ones((3, 3), np.float32),
                 'params/t': np.ones((1,), np.float32), 'params/b': np.zeros((1,), np.float32)})
  np.savez(tmp_path / 'bv.npz', **flat)
  model = _model(pool, posemb)
  variables = checkpoints.load_npz(tmp_path / 'bv.npz', model)
  images = rng.normal(0, 1, (2, 32, 32, 3)).astype(np.float32)
  feats = capture.capture(model, variables, images, ['block??', 'logits'])
  pos = sincos2d(4, 4, D) if posemb == 'sincos2d' else None
  ref_logits, ref_blocks = bv_forward(p, images, pool=pool, pos=pos)
  np.testing.assert_allclose(feats['logits'], ref_logits, rtol=1e-5, atol=2e-5)
  for i, ref in enumerate(ref_blocks):
    np.testing.assert_allclose(feats[f'block{i:02d}'], ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('case', sorted(CASES))
def test_inspect_big_vision_npz(case, tmp_path):
  # big_vision's 'mu' size (width 32, depth 1, MLP 128) is a real variant: the file names itself.
  pool, posemb, (prefix, scanned, _) = CASES[case]
  p = bv_params(np.random.default_rng(0), pool=pool, posemb=posemb, depth=1, mlp=128)
  flat = {prefix + k: v for k, v in (scan(p, 1) if scanned else p).items()}
  np.savez(tmp_path / 'bv.npz', **flat)
  info = checkpoints.inspect_npz(tmp_path / 'bv.npz')
  assert info == {'name': 'big_vision:mu/8', 'num_classes': C, 'pool_type': pool,
                  'posemb': posemb, 'representation_size': None,
                  'image_size': 32 if posemb == 'learn' else None}, info
  model = create_model(info['name'], C, pool_type=pool, posemb=posemb, image_size=32)
  checkpoints.load_npz(tmp_path / 'bv.npz', model)  # the named variant takes the file


def test_sincos2d_is_big_vision_formula():
  np.testing.assert_allclose(vit_blocks.posemb_sincos_2d(3, 5, 16), sincos2d(3, 5, 16), atol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    vit_blocks.posemb_sincos_2d(2, 2, 10)


def test_big_vision_posemb_resize_skips_the_cls_token(tmp_path):
  # big_vision's position embedding covers the grid only (CLS concatenated after the add), so
  # the whole array is the grid: 4x4 (32 px) -> 2x2 (16 px).
  rng = np.random.default_rng(5)
  p = bv_params(rng, pool='tok')
  np.savez(tmp_path / 'bv.npz', **p)
  variables = checkpoints.load_npz(tmp_path / 'bv.npz', _model('tok', image_size=16))
  got = variables['params']['Transformer']['posembed_input']['pos_embedding']
  grid = p['pos_embedding'][0].reshape(4, 4, D).astype(np.float64)
  # Corner-aligned bilinear 4 -> 2 picks rows / columns 0 and 3 exactly.
  np.testing.assert_allclose(got[0].reshape(2, 2, D), grid[np.ix_([0, 3], [0, 3])], atol=1e-6)


def test_big_vision_mismatches_are_named(tmp_path):
  rng = np.random.default_rng(0)
  p = bv_params(rng, pool='map')
  del p['MAPHead_0/probe']
  np.savez(tmp_path / 'bv.npz', **p)
  with pytest.raises(ValueError) as e:
    checkpoints.load_npz(tmp_path / 'bv.npz', _model('map'))
  assert 'missing in file (1): MAPHead_0/probe' in str(e.value)
  np.savez(tmp_path / 'bv2.npz', **bv_params(rng, pool='map'))
  with pytest.raises(ValueError) as e:  # a GAP model does not take a MAP head
    checkpoints.load_npz(tmp_path / 'bv2.npz', _model('gap'))
  assert 'unexpected in file (15): MAPHead_0/LayerNorm_0/bias' in str(e.value)


@pytest.mark.parametrize('variant, dims', [
    ('S/16', (384, 12, 1536, 6, 16)), ('B/16', (768, 12, 3072, 12, 16)),
    ('L/16', (1024, 24, 4096, 16, 16)), ('So400m/14', (1152, 27, 4304, 16, 14)),
    ('Ti/16', (192, 12, 768, 3, 16)),
])
def test_big_vision_variants(variant, dims):
  m = create_model(f'big_vision:{variant}', 0, pool_type='map')
  assert (m.hidden_size, m.num_layers, m.mlp_dim, m.num_heads, m.patch_size) == dims
  info = describe(m, 224)
  assert (info.has_cls, info.num_prefix_tokens, info.normalization) == (False, 0, 'minus_one_one')
  assert describe(create_model(f'big_vision:{variant}', 0, pool_type='tok')).has_cls


def test_big_vision_bad_names():
  with pytest.raises(KeyError, match='So400m'):
    create_model('big_vision:So400M/14', 0)
  with pytest.raises(ValueError, match='patch size'):
    create_model('big_vision:B', 0)
  with pytest.raises(ValueError, match='pool_type'):
    create_model('big_vision:B/16', 0, pool_type='avg')
