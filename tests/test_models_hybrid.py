"""R50+ViT hybrid: parameter counts, npz layout, float64 NumPy reference of the v1 backbone."""
import math
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# tests/ is on sys.path under pytest.
from test_checkpoints import random_file, vit_keys
from test_models_resnet import fast_jit

from vit_analysis.models import checkpoints
from vit_analysis.models.hybrid import VARIANTS, HybridViT


@pytest.mark.parametrize('name,expected', [('R50+ViT-B_16', 98_659_112)])
def test_param_counts(name, expected):  # vit_jax models_test.py, 1000 classes, 224 px
  model = HybridViT(**VARIANTS[name], num_classes=1000)
  (_, out), v = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                               jnp.zeros((1, 224, 224, 3)))
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(v)) == expected
  grid = 224 // VARIANTS[name]['patch_size']
  assert out['embedding'].shape == (1, grid * grid + 1, 768)


def hybrid_backbone_keys(units, width):
  """vit_jax hybrid backbone npz keys (docs/method.md#checkpoint-formats): units numbered unit1, not unit01."""
  keys = {'conv_root/kernel': (7, 7, 3, width), 'gn_root/scale': (width,), 'gn_root/bias': (width,)}
  c_in = width
  for s, n in enumerate(units, start=1):
    f = width * 2**(s - 1)
    for u in range(1, n + 1):
      p = f'block{s}/unit{u}'
      if u == 1:
        keys[f'{p}/conv_proj/kernel'] = (1, 1, c_in, 4 * f)
        keys[f'{p}/gn_proj/scale'] = keys[f'{p}/gn_proj/bias'] = (4 * f,)
      keys[f'{p}/conv1/kernel'] = (1, 1, c_in, f)
      keys[f'{p}/conv2/kernel'] = (3, 3, f, f)
      keys[f'{p}/conv3/kernel'] = (1, 1, f, 4 * f)
      for g, c in (('gn1', f), ('gn2', f), ('gn3', 4 * f)):
        keys[f'{p}/{g}/scale'] = keys[f'{p}/{g}/bias'] = (c,)
      c_in = 4 * f
  return keys, c_in


def np_same_conv(x, w, stride):
  """TF/XLA 'SAME': total padding max((o - 1) s + k - i, 0), the smaller half before."""
  k, i = w.shape[0], x.shape[1]
  o = -(-i // stride)
  total = max((o - 1) * stride + k - i, 0)
  x = np.pad(x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2),
                 (0, 0)))
  y = np.zeros((x.shape[0], o, o, w.shape[3]))
  for a in range(k):
    for b in range(k):
      y += x[:, a:a + stride * (o - 1) + 1:stride, b:b + stride * (o - 1) + 1:stride] @ w[a, b]
  return y


def np_std(w):  # vit_jax: (w - mean) / (std + 1e-5)
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  return w / (w.std(axis=(0, 1, 2), keepdims=True) + 1e-5)


def np_gn(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True)
                                                             + eps)
  return g.reshape(x.shape) * scale + bias


def np_backbone(p, x, units):
  relu = lambda z: np.maximum(z, 0)  # noqa: E731
  gn = lambda z, k: np_gn(z, p[f'{k}/scale'], p[f'{k}/bias'])  # noqa: E731
  x = relu(gn(np_same_conv(x, np_std(p['conv_root/kernel']), 2), 'gn_root'))
  # 3x3/2 'SAME' max-pool pads with -inf.
  o = -(-x.shape[1] // 2)
  total = max((o - 1) * 2 + 3 - x.shape[1], 0)
  xp = np.pad(x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2),
                  (0, 0)), constant_values=-np.inf)
  x = np.max([xp[:, a:a + 2 * (o - 1) + 1:2, b:b + 2 * (o - 1) + 1:2]
              for a in range(3) for b in range(3)], axis=0)
  acts = {'resnet/root': x}
  for s, n in enumerate(units, start=1):
    for u in range(1, n + 1):
      q, stride = f'block{s}/unit{u}', 2 if (u == 1 and s > 1) else 1
      res = x
      if f'{q}/conv_proj/kernel' in p:
        res = gn(np_same_conv(x, np_std(p[f'{q}/conv_proj/kernel']), stride), f'{q}/gn_proj')
      y = relu(gn(np_same_conv(x, np_std(p[f'{q}/conv1/kernel']), 1), f'{q}/gn1'))
      y = relu(gn(np_same_conv(y, np_std(p[f'{q}/conv2/kernel']), stride), f'{q}/gn2'))
      y = gn(np_same_conv(y, np_std(p[f'{q}/conv3/kernel']), 1), f'{q}/gn3')
      x = acts[f'resnet/block{s}/unit{u:02d}'] = relu(res + y)
  return acts


def test_tiny_hybrid_npz_loads_and_matches_float64_numpy(tmp_path):
  units = (2, 1)  # an identity unit, a stride-1 and a stride-2 projection
  keys, c = hybrid_backbone_keys(units, 64)
  vit = vit_keys(patch=1, width=32, depth=1, mlp=64, heads=2, grid=2, num_classes=3)
  vit['embedding/kernel'] = (1, 1, c, 32)
  arrays = random_file({**keys, **vit}, seed=7)
  old = dict(arrays, **{'gn_root/scale': arrays['gn_root/scale'].reshape(1, 1, 1, -1)})
  path = os.path.join(tmp_path, 'hybrid.npz')
  np.savez(path, **old)
  model = HybridViT(num_classes=3, resnet_units=units, hidden_size=32, mlp_dim=64, num_heads=2,
                    num_layers=1, patch_size=8, image_size=16)
  variables = checkpoints.load_npz(path, model)
  x = np.random.default_rng(8).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  logits, out = fast_jit(model.apply, variables, x)(variables, x)
  assert logits.shape == (2, 3) and np.abs(logits).max() > 1e-3
  ref = np_backbone({k: v.astype(np.float64) for k, v in arrays.items()}, x.astype(np.float64),
                    units)
  assert out['resnet/root'].shape == (2, 4, 4, 64)
  assert out['resnet/block2/unit01'].shape == (2, 2, 2, 512)
  assert out['embedding'].shape == (2, 5, 32) and 'block00/ln0' in out
  for k, r in ref.items():
    np.testing.assert_allclose(out[k], r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=k)
  with pytest.raises(ValueError, match='no registered'):  # tiny sizes are not registry names
    checkpoints.inspect_npz(path)
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  assert flat['gn_root/scale'].shape == (64,)


def test_inspect_names_r50_vit_b16():
  keys, c = hybrid_backbone_keys((3, 4, 9), 64)
  vit = vit_keys(patch=1, width=768, depth=12, mlp=3072, heads=12, grid=14, num_classes=1000)
  vit['embedding/kernel'] = (1, 1, c, 768)
  shapes = {k: np.broadcast_to(np.float32(0), s) for k, s in {**keys, **vit}.items()}
  assert checkpoints.inspect_npz(shapes)['name'] == 'R50+ViT-B_16'
  assert checkpoints.inspect_npz(shapes)['image_size'] == 224


def test_v1_std_conv_and_group_norm_epsilons():
  # vit_jax: (w - mean) / (std + 1e-5) (not BiT's sqrt(var + 1e-10)); Flax GroupNorm eps 1e-6.
  from vit_analysis.models import hybrid
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
  w = (1e-5 * rng.standard_normal((1, 1, 4, 2))).astype(np.float32)  # std ~1e-5 ~ eps
  y = hybrid.StdConv(2, (1, 1), use_bias=False).apply({'params': {'kernel': w}}, x)
  np.testing.assert_allclose(y, x.astype(np.float64) @ np_std(w.astype(np.float64))[0, 0],
                             rtol=1e-4, atol=1e-5)
  # A whole unit on tiny activations (conv outputs with variance ~ GroupNorm's eps 1e-6).
  unit = hybrid.ResidualUnit(features=16, num_groups=8)
  small = (1e-4 * rng.standard_normal((1, 4, 4, 64))).astype(np.float32)
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(unit.init, jax.random.key(0), small)['params'], sep='/')
  p = {k: rng.uniform(0.5, 1.5, s.shape) if k.endswith('scale') else
       0.3 * rng.standard_normal(s.shape) for k, s in shapes.items()}
  variables = {'params': flax.traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in p.items()}, sep='/')}
  got = fast_jit(unit.apply, variables, small)(variables, small)

  def gn(z, k):
    return np_gn(z, p[f'{k}/scale'], p[f'{k}/bias'], groups=8)

  y = np.maximum(gn(np_same_conv(small.astype(np.float64), np_std(p['conv1/kernel']), 1), 'gn1'), 0)
  y = np.maximum(gn(np_same_conv(y, np_std(p['conv2/kernel']), 1), 'gn2'), 0)
  y = gn(np_same_conv(y, np_std(p['conv3/kernel']), 1), 'gn3')
  np.testing.assert_allclose(got, np.maximum(small + y, 0), rtol=1e-4, atol=1e-4)
