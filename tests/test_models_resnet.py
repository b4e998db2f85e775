"""BiT ResNet-v2: parameter counts, official names, capture order, float64 NumPy reference."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.models import resnet
from vit_analysis.models.resnet import VARIANTS, ResNetV2

# docs/method.md#models (agree with the published BiT / timm sizes): 1000-class / 21843-class heads.
PARAM_COUNTS = [
    ('R50x1', 25_549_352, 68_256_659),
    ('R101x1', 44_541_480, 87_248_787),
    ('R152x2', 236_335_208, 321_728_979),
    ('R50x3', 217_319_080, None),
    ('R101x3', 387_934_888, None),
    ('R152x4', 936_533_224, None),
]


@functools.lru_cache(maxsize=None)
def _variant_abstract(name, num_classes=1000, size=224):
  """(out, flat param shapes) of a registered variant, from one jax.eval_shape (no compute)."""
  model = ResNetV2(**VARIANTS[name], num_classes=num_classes)
  (_, out), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), jnp.zeros((1, size, size, 3)))
  return out, flax.traverse_util.flatten_dict(variables['params'], sep='/')


def _variant_shapes(name):
  return _variant_abstract(name)[1]


def _shapes(model, size):
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return flax.traverse_util.flatten_dict(v['params'], sep='/')


def fast_jit(fn, *args):
  """jit + compile at XLA backend optimisation level 0: half the compile time on CPU, which
  dominates these tiny-model tests; the maths checked is the same."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


@pytest.mark.parametrize('name,expected_1k,expected_21k', PARAM_COUNTS)
def test_param_counts(name, expected_1k, expected_21k):
  shapes = _variant_shapes(name)
  total = sum(int(np.prod(s.shape)) for s in shapes.values())
  assert total == expected_1k
  if expected_21k is not None:
    # Swapping the head is exact arithmetic on the head's (c + 1) x classes parameters; one
    # eval_shape per architecture keeps the test fast on 2 loaded cores.
    c = shapes['resnet/head/conv2d/kernel'].shape[2]
    assert total + (c + 1) * (21843 - 1000) == expected_21k


def test_param_count_21k_head_directly():
  shapes = _shapes(ResNetV2(**VARIANTS['R50x1'], num_classes=21843), 224)
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == 68_256_659


def test_variants_and_attributes():
  for name in ['R26x1', 'R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4',
               'R26x1-small', 'R-demo', 'R-smoke']:
    assert name in VARIANTS, name
  assert ResNetV2(**VARIANTS['R101x3'], num_classes=3).block_units == (3, 4, 23, 3)
  assert ResNetV2(**VARIANTS['R26x1-small'], num_classes=3).block_units == (2, 2, 2, 2)


def _official_keys(units, wf, width=64, num_classes=1000, root=7, cin=3):
  """The BiT npz key list with shapes, written from big_transfer's layout (docs/method.md#checkpoint-formats)."""
  w = width * wf
  keys = {'resnet/root_block/standardized_conv2d/kernel': (root, root, cin, w)}
  c_in = w
  for s, n in enumerate(units, start=1):
    mid = w * 2**(s - 1)
    for u in range(1, n + 1):
      p = f'resnet/block{s}/unit{u:02d}'
      keys[f'{p}/a/group_norm/gamma'] = keys[f'{p}/a/group_norm/beta'] = (c_in,)
      keys[f'{p}/a/standardized_conv2d/kernel'] = (1, 1, c_in, mid)
      if u == 1:
        keys[f'{p}/a/proj/standardized_conv2d/kernel'] = (1, 1, c_in, 4 * mid)
      keys[f'{p}/b/group_norm/gamma'] = keys[f'{p}/b/group_norm/beta'] = (mid,)
      keys[f'{p}/b/standardized_conv2d/kernel'] = (3, 3, mid, mid)
      keys[f'{p}/c/group_norm/gamma'] = keys[f'{p}/c/group_norm/beta'] = (mid,)
      keys[f'{p}/c/standardized_conv2d/kernel'] = (1, 1, mid, 4 * mid)
      c_in = 4 * mid
  keys['resnet/group_norm/gamma'] = keys['resnet/group_norm/beta'] = (c_in,)
  keys['resnet/head/conv2d/kernel'] = (1, 1, c_in, num_classes)
  keys['resnet/head/conv2d/bias'] = (num_classes,)
  return keys


@pytest.mark.parametrize('name,units,wf', [('R50x1', (3, 4, 6, 3), 1),
                                           ('R152x2', (3, 8, 36, 3), 2)])
def test_param_names_are_official_keys(name, units, wf):
  got = {k: tuple(v.shape) for k, v in _variant_shapes(name).items()}
  assert got == _official_keys(units, wf, num_classes=1000)


# ------------------------------------------------------------------ float64 NumPy reference


def np_conv(x, w, stride, pad):
  """x: [b, h, w, ci] float64; w: [kh, kw, ci, co]; symmetric zero padding, VALID conv."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      y += patch @ w[i, j]
  return y


def np_std_weight(w, eps=1e-10):
  w = w.astype(np.float64)
  m = w.mean(axis=(0, 1, 2), keepdims=True)
  v = ((w - m)**2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - m) / np.sqrt(v + eps)


def np_group_norm(x, gamma, beta, groups, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  m = g.mean(axis=(1, 2, 4), keepdims=True)
  v = ((g - m)**2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - m) / np.sqrt(v + eps)).reshape(x.shape) * gamma + beta


def np_max_pool_3x3_s2_zero_pad(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  y = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
  for i in range(3):
    for j in range(3):
      y = np.maximum(y, x[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2])
  return y


def np_unit(p, prefix, x, stride, groups):
  """One BiT-v2 bottleneck from the flat official keys; returns (output, conv_c, shortcut)."""
  def relu(z):
    return np.maximum(z, 0)

  def gn(z, s):
    return np_group_norm(z, p[f'{prefix}/{s}/group_norm/gamma'],
                         p[f'{prefix}/{s}/group_norm/beta'], groups)

  def conv(z, s, stride, pad):
    return np_conv(z, np_std_weight(p[f'{prefix}/{s}/standardized_conv2d/kernel']), stride, pad)

  y = relu(gn(x, 'a'))
  proj_key = f'{prefix}/a/proj/standardized_conv2d/kernel'
  shortcut = np_conv(y, np_std_weight(p[proj_key]), stride, 0) if proj_key in p else x
  y = conv(y, 'a', 1, 0)
  y = conv(relu(gn(y, 'b')), 'b', stride, 1)
  y = conv(relu(gn(y, 'c')), 'c', 1, 0)
  return y + shortcut, y, shortcut


def np_resnet(p, x, units, groups, small_stem):
  x = x.astype(np.float64)
  root = np_std_weight(p['resnet/root_block/standardized_conv2d/kernel'])
  if small_stem:
    x = np_conv(x, root, 1, 1)
  else:
    x = np_max_pool_3x3_s2_zero_pad(np_conv(x, root, 2, 3))
  acts = {'root': x}
  for s, n in enumerate(units, start=1):
    for u in range(1, n + 1):
      x, _, _ = np_unit(p, f'resnet/block{s}/unit{u:02d}', x, 2 if (u == 1 and s > 1) else 1,
                        groups)
      acts[f'block{s}/unit{u:02d}'] = x
  x = np.maximum(np_group_norm(x, p['resnet/group_norm/gamma'], p['resnet/group_norm/beta'],
                               groups), 0)
  x = x.mean(axis=(1, 2))
  acts['pre_logits'] = x
  return x @ p['resnet/head/conv2d/kernel'][0, 0] + p['resnet/head/conv2d/bias'], acts


def _random_params(model, size, seed=0):
  """Random values for every param (GN gamma/beta and head too, whose inits are constant)."""
  shapes = _shapes(model, size)
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in shapes.items():
    if k.endswith('gamma'):
      flat[k] = rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    else:
      flat[k] = (0.3 * rng.standard_normal(s.shape)).astype(np.float32)
  return flat


def test_forward_matches_float64_numpy():
  # Standard stem (7x7/2 conv, zero-padded 3x3/2 max-pool) at 32 px; the small stem is checked
  # against the same reference in test_checkpoints.py. Two stages cover an identity unit, a
  # stride-1 and a stride-2 projection; more would only add XLA compile time.
  kw = dict(VARIANTS['R-smoke'], small_stem=False, block_units=(2, 1))
  model = ResNetV2(**kw, num_classes=5)
  flat = _random_params(model, 32)
  params = {'params': flax.traverse_util.unflatten_dict(flat, sep='/')}
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  logits, out = fast_jit(model.apply, params, x)(params, x)
  ref_logits, acts = np_resnet({k: v.astype(np.float64) for k, v in flat.items()}, x,
                               kw['block_units'], kw['num_groups'], small_stem=False)
  for k, ref in acts.items():
    np.testing.assert_allclose(out[k], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=k)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
  assert np.abs(ref_logits).max() > 0.1  # a non-trivial comparison
  assert out['root'].shape == (2, 8, 8, 8)


def test_projection_unit_with_stride_matches_numpy():
  # Even input + stride 2: BiT's symmetric padding differs from XLA 'SAME', so this can fail.
  unit = resnet.BottleneckUnit(features=8, strides=2, num_groups=4)
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 16)).astype(np.float32)
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(unit.init, jax.random.key(0), x)['params'], sep='/')
  rng = np.random.default_rng(3)
  flat = {k: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) if k.endswith('gamma')
          else rng.standard_normal(s.shape).astype(np.float32) for k, s in shapes.items()}
  params = {'params': flax.traverse_util.unflatten_dict(flat, sep='/')}
  y, out = fast_jit(unit.apply, params, x)(params, x)
  ref, ref_c, ref_short = np_unit({'u/' + k: v.astype(np.float64) for k, v in flat.items()},
                                  'u', x.astype(np.float64), 2, 4)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_allclose(out['conv_c'], ref_c, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out['proj'], ref_short, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_capture_names_in_forward_order():
  model = ResNetV2(**VARIANTS['R-smoke'], num_classes=3)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  order = []

  def names(v, x):
    logits, out = model.apply(v, x)
    order.extend(out)  # dict insertion order (jax pytrees would sort the keys)
    return logits

  jax.eval_shape(names, variables, x)
  expected = ['root/conv', 'root']
  for s in range(1, 5):
    u = f'block{s}/unit01'
    expected += [f'{u}/preact_a', f'{u}/proj', f'{u}/conv_a', f'{u}/preact_b', f'{u}/conv_b',
                 f'{u}/preact_c', f'{u}/conv_c', u]
  expected += ['head_norm', 'pre_logits', 'logits']
  assert order == expected
  shapes = jax.eval_shape(lambda v, x: model.apply(v, x)[1], variables, x)
  assert shapes['root'].shape == (1, 32, 32, 8)
  assert shapes['block4/unit01'].shape == (1, 4, 4, 256)
  assert shapes['head_norm'].shape == (1, 4, 4, 256)
  assert shapes['pre_logits'].shape == (1, 256)


def test_standard_stem_shapes_at_224():
  out = _variant_abstract('R50x1')[0]
  assert out['root/conv'].shape == (1, 112, 112, 64)
  assert out['root'].shape == (1, 56, 56, 64)
  assert out['block1/unit03'].shape == (1, 56, 56, 256)
  assert out['block4/unit03'].shape == (1, 7, 7, 2048)  # docs/method.md#reference-values: R50 final stage 7x7
  assert out['logits'].shape == (1, 1000)
  assert 'block2/unit02/proj' not in out and 'block2/unit01/proj' in out


def test_bad_inputs():
  model = ResNetV2(**VARIANTS['R-smoke'], num_classes=3)
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))
  bad_groups = ResNetV2(**dict(VARIANTS['R-smoke'], num_groups=5), num_classes=3)
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(bad_groups.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_epsilons_where_they_matter():
  # Tiny kernels / activations make the epsilons visible: BiT's weight standardization adds
  # 1e-10 inside the sqrt (vit_jax's hybrid adds 1e-5 to the std instead), GroupNorm 1e-5.
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
  w = (1e-6 * rng.standard_normal((1, 1, 4, 2))).astype(np.float32)  # var ~1e-12 << 1e-10
  y = resnet.StdConv(2).apply({'params': {'kernel': w}}, x)
  np.testing.assert_allclose(y, np_conv(x.astype(np.float64), np_std_weight(w), 1, 0),
                             rtol=1e-4, atol=1e-5)
  assert np.abs(y).max() < 1.0  # eps 1e-10 keeps it ~0.36; without eps it would be ~4.4
  small = (1e-3 * rng.standard_normal((1, 4, 4, 8))).astype(np.float32)  # var ~1e-6 << 1e-5
  gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
  z = resnet.GroupNorm(2).apply({'params': {'gamma': gamma, 'beta': beta}}, small)
  np.testing.assert_allclose(z, np_group_norm(small.astype(np.float64), gamma, beta, 2),
                             rtol=1e-4, atol=1e-6)
  assert np.abs(z).max() < 1.2  # eps 1e-5 gives ~0.9; eps 1e-6 would give ~2.1
