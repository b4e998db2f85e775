"""ViT and MLP-Mixer: parameter counts, shapes, names, and float64 NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis import models
from vit_analysis.models import create_model

# vit_jax models_test.py (1 000 classes, 224 px); Mixer-H/14 computed in docs/method.md#models.
PARAM_COUNTS = {
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-H_14': 632_045_800,
    'ViT-L_32': 306_535_400,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_32-gap-norep': 88_222_696,
    'Mixer-B_16': 59_880_472,
    'Mixer-B_32': 60_293_428,
    'Mixer-L_16': 208_196_168,
}


def _abstract_init(model, shape):
  """(logits, out, variables) as ShapeDtypeStructs, without computing anything.

  eval_shape returns `out` with sorted keys; order tests use `_traced_order`.
  """
  def init(x):
    (logits, out), variables = model.init_with_output(jax.random.key(0), x, train=False)
    return logits, out, variables
  return jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_param_count_and_shapes_224(name):
  logits, out, variables = _abstract_init(create_model(name, 1000), (2, 224, 224, 3))
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(variables))
  assert count == PARAM_COUNTS[name]
  assert logits.shape == (2, 1000)
  assert out['logits'].shape == (2, 1000)


def test_every_registered_model_forward_shape_small_images():
  """Abstract forward of every registered ViT and Mixer at a small input size.

  A '-gap' variant whose token-classifier twin was already traced in full differs from it only in
  `classifier`, so it is traced with one block (tracing deep models dominates this test's time).
  """
  traced = {create_model(n, 7) for n in PARAM_COUNTS}
  names = [n for n in models.model_names() if n.startswith(('ViT-', 'Mixer-'))]
  assert len(names) > 30
  for name in names:
    model = create_model(name, 7)
    if model in traced:  # e.g. 'ViT-B_32-gap' is the same module as 'ViT-B_32-gap-norep'.
      continue
    traced.add(model)
    patch = model.patch_size
    size = model.image_size if model.image_size <= 64 else 2 * patch
    if getattr(model, 'classifier', None) == 'gap' and model.clone(classifier='token') in traced:
      model = model.clone(num_layers=1)
    logits, out, _ = _abstract_init(model, (2, size, size, 3))
    assert logits.shape == (2, 7), name
    assert out['pre_logits'].shape == (2, getattr(model, 'hidden_size', None) or
                                       model.hidden_dim), name
    tokens = (size // patch) ** 2 + (getattr(model, 'classifier', 'gap') == 'token')
    assert out['block00'].shape[:2] == (2, tokens), name


def test_registry_names_and_errors():
  names = models.model_names()
  for n in ['ViT-B_16', 'ViT-B_16-gap', 'ViT-H_14', 'ViT-Ti_4', 'ViT-demo_4', 'ViT-demo_4-gap',
            'ViT-smoke_8', 'ViT-smoke_8-gap', 'Mixer-S_16', 'Mixer-S_32', 'Mixer-Ti_4',
            'Mixer-demo_4', 'Mixer-smoke_8']:
    assert n in names
  with pytest.raises(KeyError, match="ViT-B_16"):
    create_model('ViT-B16', 10)  # close match listed
  with pytest.raises(KeyError, match='skip_removd'):
    create_model('ViT-B_16', 10, skip_removd=(1,))
  m = create_model('ViT-B_16', 10, skip_removed=[1, 2], image_size=384)
  assert m.skip_removed == (1, 2) and m.image_size == 384 and m.num_classes == 10
  assert (m.patch_size, m.num_heads, m.classifier, m.num_layers) == (16, 12, 'token', 12)
  assert create_model('ViT-B_32-gap', 3).classifier == 'gap'
  assert create_model('Mixer-B_32', 3).patch_size == 32


def test_resnet_and_hybrid_families_merged():
  from vit_analysis.models import resnet  # pylint: disable=g-import-not-at-top
  for n in resnet.VARIANTS:
    assert n in models.model_names()
  assert isinstance(create_model('R50x1', 10), resnet.ResNetV2)
  assert 'R26x1-small' in models.model_names()
  if hasattr(models, 'hybrid'):  # R50+ViT hybrids (optional module).
    assert 'R50+ViT-B_16' in models.model_names()


def test_param_names_match_official_npz_keys():
  model = create_model('ViT-smoke_8', 10, representation_size=32)
  _, _, variables = _abstract_init(model, (1, 32, 32, 3))
  flat = {'/'.join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(variables['params'])}
  b = 'Transformer/encoderblock_1/'
  expected = {
      'embedding/kernel': (8, 8, 3, 32), 'embedding/bias': (32,), 'cls': (1, 1, 32),
      'Transformer/posembed_input/pos_embedding': (1, 17, 32),
      b + 'LayerNorm_0/scale': (32,), b + 'LayerNorm_0/bias': (32,),
      b + 'MultiHeadDotProductAttention_1/query/kernel': (32, 2, 16),
      b + 'MultiHeadDotProductAttention_1/key/bias': (2, 16),
      b + 'MultiHeadDotProductAttention_1/value/kernel': (32, 2, 16),
      b + 'MultiHeadDotProductAttention_1/out/kernel': (2, 16, 32),
      b + 'MultiHeadDotProductAttention_1/out/bias': (32,),
      b + 'LayerNorm_2/scale': (32,), b + 'MlpBlock_3/Dense_0/kernel': (32, 64),
      b + 'MlpBlock_3/Dense_1/kernel': (64, 32), b + 'MlpBlock_3/Dense_1/bias': (32,),
      'Transformer/encoder_norm/scale': (32,), 'pre_logits/kernel': (32, 32),
      'head/kernel': (32, 10), 'head/bias': (10,),
  }
  for k, shape in expected.items():
    assert flat.get(k) == shape, k
  assert len(flat) == 4 + 16 * 2 + 2 + 2 + 2  # emb 2, cls, pos; 16 per block; norm, pre, head

  mixer = create_model('Mixer-smoke_8', 10)
  _, _, variables = _abstract_init(mixer, (1, 32, 32, 3))
  flat = {'/'.join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(variables['params'])}
  for k, shape in {'stem/kernel': (8, 8, 3, 32), 'MixerBlock_1/LayerNorm_0/scale': (32,),
                   'MixerBlock_1/token_mixing/Dense_0/kernel': (16, 16),
                   'MixerBlock_1/token_mixing/Dense_1/kernel': (16, 16),
                   'MixerBlock_0/LayerNorm_1/bias': (32,),
                   'MixerBlock_0/channel_mixing/Dense_0/kernel': (32, 64),
                   'MixerBlock_0/channel_mixing/Dense_1/bias': (32,),
                   'pre_head_layer_norm/scale': (32,), 'head/kernel': (32, 10)}.items():
    assert flat.get(k) == shape, k
  assert len(flat) == 2 + 2 * 12 + 2 + 2


def _vit_names(depth):
  names = ['embedding']
  for i in range(depth):
    p = f'block{i:02d}'
    names += [f'{p}/{s}' for s in ('ln0', 'attn_weights', 'attn_heads', 'sa', '+sa', 'ln2',
                                   'mlp_hidden', 'mlp')] + [p]
  return names + ['encoder_norm', 'pre_logits', 'logits']


def _traced_order(model, shape):
  """{name: ShapeDtypeStruct} in the order the forward pass inserted them."""
  order = []

  def init(x):
    (_, out), _ = model.init_with_output(jax.random.key(0), x)
    order.extend(out)  # While tracing, `out` is still the model's own (ordered) dict.
    return out

  shapes = jax.eval_shape(init, jax.ShapeDtypeStruct(shape, jnp.float32))
  return {k: shapes[k] for k in order}


def test_capture_names_and_shapes_in_forward_order():
  out = _traced_order(create_model('ViT-smoke_8', 10), (3, 32, 32, 3))
  assert list(out) == _vit_names(2)
  shapes = {'embedding': (3, 17, 32), 'block01/attn_weights': (3, 2, 17, 17),
            'block01/attn_heads': (3, 17, 2, 16), 'block00/mlp_hidden': (3, 17, 64),
            'block01': (3, 17, 32), 'pre_logits': (3, 32)}
  for k, s in shapes.items():
    assert out[k].shape == s, k
  _, out, _ = _abstract_init(create_model('ViT-smoke_8-gap', 10), (3, 32, 32, 3))
  assert out['embedding'].shape == (3, 16, 32) and out['block00/attn_weights'].shape[-1] == 16

  out = _traced_order(create_model('Mixer-smoke_8', 10), (3, 32, 32, 3))
  expected = ['stem']
  for i in range(2):
    p = f'block{i:02d}'
    expected += [f'{p}/{s}' for s in ('ln0', 'token_mixing', '+token', 'ln1',
                                      'channel_mixing')] + [p]
  assert list(out) == expected + ['pre_head_layer_norm', 'pre_logits', 'logits']
  assert out['block01/token_mixing'].shape == (3, 16, 32)


# ---------------------------------------------------------------- float64 NumPy references.


def _random_params(model, x, seed=0):
  """Random params in the model's structure (no init compile): every value matters."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape) + (1.0 if s.ndim == 1 else 0.0),
                            jnp.float32), shapes)


_COMPILED = {}


def _apply(model, variables, x, train=False, rngs=None):
  """Jitted apply, compiled once per (model, train) at XLA opt level 0 (tiny models: compile
  time dominates; the float64 comparisons below do not depend on the optimisation level)."""
  key = (model, train, x.shape)
  if key not in _COMPILED:
    fn = jax.jit(lambda v, x, r: model.apply(v, x, train=train, rngs=r))
    _COMPILED[key] = fn.lower(variables, x, rngs).compile(
        {'xla_backend_optimization_level': 0})
  return _COMPILED[key](variables, x, rngs)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def _np_patches(images, patch):
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _np_encoder_block(x, p, skip=True):
  """One pre-LN transformer block in float64: returns dict of the sub-layer values."""
  a = p['MultiHeadDotProductAttention_1']
  y = _ln(x, p['LayerNorm_0'])
  q, k, v = (np.einsum('btd,dhe->bthe', y, a[n]['kernel']) + a[n]['bias']
             for n in ('query', 'key', 'value'))
  logits = np.einsum('bqhe,bkhe->bhqk', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  heads = np.einsum('bhqk,bkhe->bqhe', w, v)
  sa = np.einsum('bqhe,hed->bqd', heads, a['out']['kernel']) + a['out']['bias']
  r = x + sa if skip else sa
  m = p['MlpBlock_3']
  hidden = _gelu_tanh(_dense(_ln(r, p['LayerNorm_2']), m['Dense_0']))
  mlp = _dense(hidden, m['Dense_1'])
  return {'attn_weights': w, 'attn_heads': heads, 'sa': sa, '+sa': r, 'mlp_hidden': hidden,
          'mlp': mlp, '': r + mlp if skip else mlp}


@pytest.mark.parametrize('skip_removed', [(), (0,)])
def test_vit_forward_matches_float64_numpy(skip_removed):
  model = create_model('ViT-smoke_8', 5, skip_removed=skip_removed)
  x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
  params = _random_params(model, x)
  logits, out = _apply(model, {'params': params}, x)
  p, xn = _np(params), np.asarray(x, np.float64)

  # Embedding: patches x kernel (HWIO flattened in (h, w, c) order), CLS first, + pos-emb.
  emb = _np_patches(xn, 8) @ p['embedding']['kernel'].reshape(-1, 32) + p['embedding']['bias']
  cls = np.broadcast_to(p['cls'], (2, 1, 32))
  emb = np.concatenate([cls, emb], 1) + p['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(out['embedding'], emb, atol=1e-4, rtol=1e-4)

  ref = _np_encoder_block(emb, p['Transformer']['encoderblock_0'], skip=not skip_removed)
  for k, v in ref.items():
    np.testing.assert_allclose(out['block00' + (f'/{k}' if k else '')], v, atol=1e-4, rtol=1e-4,
                               err_msg=k)
  if skip_removed:  # No residual: the outputs are the branches themselves.
    np.testing.assert_array_equal(out['block00/+sa'], out['block00/sa'])
    np.testing.assert_array_equal(out['block00'], out['block00/mlp'])

  # Head from the captured last block: final norm, CLS token, head.
  last = np.asarray(out['block01'], np.float64)
  normed = _ln(last, p['Transformer']['encoder_norm'])
  np.testing.assert_allclose(out['encoder_norm'], normed, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits, _dense(normed[:, 0], p['head']), atol=1e-4, rtol=1e-4)


def test_vit_gap_and_representation_head_match_numpy():
  model = create_model('ViT-smoke_8-gap', 4, representation_size=6)
  x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3), minval=-1, maxval=1)
  params = _random_params(model, x)
  logits, out = _apply(model, {'params': params}, x)
  p = _np(params)
  pooled = np.asarray(out['encoder_norm'], np.float64).mean(1)
  pre = np.tanh(_dense(pooled, p['pre_logits']))
  np.testing.assert_allclose(out['pre_logits'], pre, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, _dense(pre, p['head']), atol=1e-5, rtol=1e-5)
  assert 'cls' not in params


def test_attention_weights_rows_sum_to_one():
  model = create_model('ViT-smoke_8', 5)
  x = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3), minval=-1, maxval=1)
  _, out = _apply(model, {'params': _random_params(model, x)}, x)
  w = np.asarray(out['block01/attn_weights'], np.float64)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert (w >= 0).all() and w.std() > 1e-3  # Not uniform: the check can fail.


def test_mixer_block_matches_float64_numpy():
  model = create_model('Mixer-smoke_8', 5, skip_removed=(1,))
  x = jax.random.uniform(jax.random.key(6), (2, 32, 32, 3), minval=-1, maxval=1)
  params = _random_params(model, x)
  logits, out = _apply(model, {'params': params}, x)
  p = _np(params)
  stem = _np_patches(np.asarray(x, np.float64), 8) @ p['stem']['kernel'].reshape(-1, 32)
  stem = stem + p['stem']['bias']
  np.testing.assert_allclose(out['stem'], stem, atol=1e-4, rtol=1e-4)
  h = stem
  for i, skip in ((0, True), (1, False)):
    b = p[f'MixerBlock_{i}']
    mlp = lambda z, q: _dense(_gelu_tanh(_dense(z, q['Dense_0'])), q['Dense_1'])
    tok = mlp(_ln(h, b['LayerNorm_0']).transpose(0, 2, 1), b['token_mixing']).transpose(0, 2, 1)
    np.testing.assert_allclose(out[f'block{i:02d}/token_mixing'], tok, atol=1e-4, rtol=1e-4)
    h = h + tok if skip else tok
    ch = mlp(_ln(h, b['LayerNorm_1']), b['channel_mixing'])
    h = h + ch if skip else ch
    np.testing.assert_allclose(out[f'block{i:02d}'], h, atol=1e-4, rtol=1e-4)
  pooled = _ln(h, p['pre_head_layer_norm']).mean(1)
  np.testing.assert_allclose(logits, _dense(pooled, p['head']), atol=1e-4, rtol=1e-4)


def test_dropout_only_in_training():
  model = create_model('ViT-smoke_8', 5, dropout_rate=0.5)
  x = jax.random.uniform(jax.random.key(7), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = {'params': _random_params(model, x)}
  ref = create_model('ViT-smoke_8', 5)  # Same params, no dropout at all.
  np.testing.assert_array_equal(_apply(model, variables, x)[0], _apply(ref, variables, x)[0])
  t1, _ = _apply(model, variables, x, True, {'dropout': jax.random.key(0, impl='rbg')})
  t2, _ = _apply(model, variables, x, True, {'dropout': jax.random.key(1, impl='rbg')})
  assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-3


def test_bad_inputs_raise():
  model = create_model('ViT-smoke_8', 5)
  with pytest.raises(ValueError, match='divisible'):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))
  with pytest.raises(ValueError, match='out of range'):
    create_model('ViT-smoke_8', 5, skip_removed=(2,)).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='classifier'):
    create_model('ViT-smoke_8', 5, classifier='max').init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
