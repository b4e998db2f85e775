"""capture.py: names in forward order, glob selection, jitted capture, reduce, memory plan."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.models import capture, create_model

SHAPE = (2, 32, 32, 3)


@pytest.fixture(scope='module')
def vit():
  model = create_model('ViT-smoke_8', 10)
  x = jax.random.uniform(jax.random.key(0), SHAPE, minval=-1, maxval=1)
  variables = _random_variables(model, x)
  # Reference: the model's full `out`, from a plain jitted apply (opt level 0: tiny model).
  full = jax.jit(lambda v, x: model.apply(v, x)[1]).lower(variables, x).compile(
      {'xla_backend_optimization_level': 0})(variables, x)
  return model, variables, x, full


def _random_variables(model, x):
  """Random values in the model's param structure: no init compile, nothing trivially constant."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), shapes)


def _expected_vit_names(depth):
  names = ['embedding']
  for i in range(depth):
    names += [f'block{i:02d}/{s}' for s in ('ln0', 'attn_weights', 'attn_heads', 'sa', '+sa',
                                            'ln2', 'mlp_hidden', 'mlp')] + [f'block{i:02d}']
  return names + ['encoder_norm', 'pre_logits', 'logits']


def test_layer_names_forward_order():
  model = create_model('ViT-smoke_8', 10)
  assert capture.layer_names(model, (32, 32, 3)) == _expected_vit_names(2)
  assert capture.layer_names(model, (5, 32, 32, 3)) == _expected_vit_names(2)
  mixer = capture.layer_names(create_model('Mixer-smoke_8', 10), (32, 32, 3))
  assert mixer[:4] == ['stem', 'block00/ln0', 'block00/token_mixing', 'block00/+token']
  assert mixer[-4:] == ['block01', 'pre_head_layer_norm', 'pre_logits', 'logits']
  # Large models are traced abstractly (no memory): ViT-B/32 fine capture set = 74 (docs/method.md#presets).
  names = capture.layer_names(create_model('ViT-B_32', 1000), (224, 224, 3))
  fine = capture.select(names, ['embedding', 'block??/ln0', 'block??/sa', 'block??/+sa',
                                'block??/ln2', 'block??/mlp_hidden', 'block??', 'encoder_norm'])
  assert len(fine) == 74 and fine[0] == 'embedding' and fine[-1] == 'encoder_norm'
  shapes = capture.layer_shapes(model, (4, 32, 32, 3))
  assert list(shapes) == _expected_vit_names(2)
  assert shapes['block01/attn_heads'].shape == (4, 17, 2, 16)
  assert capture.layer_shapes(model, (32, 32, 3))['pre_logits'].shape == (1, 32)
  with pytest.raises(ValueError, match='image_shape'):
    capture.layer_names(model, (32, 32))


def test_select_glob_order_and_errors():
  names = _expected_vit_names(2)
  # Forward order is kept whatever the pattern order; a name matched twice appears once.
  assert capture.select(names, ['encoder_norm', 'block*/+sa', 'block01/+sa']) == [
      'block00/+sa', 'block01/+sa', 'encoder_norm']
  assert capture.select(names, 'block??') == ['block00', 'block01']
  assert capture.select(names, 'block01/*')[0] == 'block01/ln0'
  assert capture.select(names, '*') == names
  with pytest.raises(KeyError) as e:
    capture.select(names, ['block00', 'block00/attn_weight'])
  assert 'block00/attn_weights' in str(e.value)
  with pytest.raises(KeyError, match='encoder_norm'):
    capture.select(names, 'encoder_nrom')
  with pytest.raises(ValueError):
    capture.select(names, [])


def test_capture_matches_apply_and_keeps_order(vit):
  model, variables, x, out = vit
  got = capture.capture(model, variables, x, layers=['pre_logits', 'block*/attn_weights',
                                                     'embedding'])
  assert list(got) == ['embedding', 'block00/attn_weights', 'block01/attn_weights', 'pre_logits']
  for k, v in got.items():
    np.testing.assert_allclose(v, out[k], rtol=1e-6, atol=1e-6)
  # The compiled function is cached per (model, selection, reduce).
  n = len(capture._JIT_CACHE)
  capture.capture(model, variables, x, layers=['embedding', 'block*/attn_weights', 'pre_logits'])
  assert len(capture._JIT_CACHE) == n
  with pytest.raises(KeyError, match='block00/mlp_hidden'):
    capture.capture(model, variables, x, layers='block00/mlp_hiden')
  with pytest.raises(ValueError, match='shape'):
    capture.capture(model, variables, x[0], layers='block00')


def _gram(x):
  f = jnp.reshape(x, (x.shape[0], -1))
  return f @ f.T


def test_make_capture_fn_inside_jit_with_reduce(vit):
  model, variables, x, full = vit
  fn = capture.make_capture_fn(model, 'block??', reduce=_gram)

  @jax.jit
  def step(v, images):  # e.g. a CKA accumulation step consuming Grams.
    grams = fn(v, images)
    return {k: g * 2.0 for k, g in grams.items()}

  got = step(variables, x)
  assert sorted(got) == ['block00', 'block01']
  for k in got:
    a = full[k]
    f = np.asarray(a, np.float64).reshape(2, -1)
    np.testing.assert_allclose(got[k], 2.0 * f @ f.T, rtol=1e-4)
  # The reduced function only returns [b, b] arrays.
  shapes = jax.eval_shape(fn, variables, jax.ShapeDtypeStruct(SHAPE, jnp.float32))
  assert {k: s.shape for k, s in shapes.items()} == {'block00': (2, 2), 'block01': (2, 2)}


def test_plan_bytes_matches_arrays(vit):
  model, _, _, full = vit
  plan = capture.plan_bytes(model, (32, 32, 3), batch=2, layers=['block00/*', 'logits'])
  assert list(plan) == capture.select(_expected_vit_names(2), ['block00/*', 'logits'])
  assert plan == {k: full[k].nbytes for k in plan}
  assert plan['block00/attn_weights'] == 2 * 2 * 17 * 17 * 4
  reduced = capture.plan_bytes(model, (7, 32, 32, 3), batch=64, layers='block??', reduce=_gram)
  assert reduced == {'block00': 64 * 64 * 4, 'block01': 64 * 64 * 4}
  # ViT-B/16 at 224 px, batch 8: attention weights of one block = 8 * 12 * 197^2 floats.
  big = capture.plan_bytes(create_model('ViT-B_16', 1000), (224, 224, 3), 8,
                           'block03/attn_weights')
  assert big == {'block03/attn_weights': 8 * 12 * 197 * 197 * 4}
  assert math.prod((8, 197, 768)) * 4 == capture.plan_bytes(
      create_model('ViT-B_16', 1000), (224, 224, 3), 8, 'block03')['block03']
  with pytest.raises(ValueError, match='batch'):
    capture.plan_bytes(model, (32, 32, 3), 0)


def test_mixer_capture(vit):
  del vit
  model = create_model('Mixer-smoke_8', 10)
  x = jnp.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
  variables = _random_variables(model, x)
  got = capture.capture(model, variables, x, layers=['block*/+token', 'stem'])
  assert list(got) == ['stem', 'block00/+token', 'block01/+token']
  assert got['block01/+token'].shape == (2, 16, 32)
