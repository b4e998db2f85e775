"""capture on Flax modules that do not fill an `out` dict: method interception.

A linen ViT on `nn.MultiHeadDotProductAttention` and a linen pre-activation CNN are written here
in plain Flax, given the weights of the built-in ViT-smoke_8 / R-smoke, and must give the same
activations and the same linear-CKA grid through interception as the built-ins through `out`.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis.models import capture, create_model, describe
from vit_analysis.similarity import cka


class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.hidden, name='fc1')(x))
    return nn.Dense(x.shape[-1], name='fc2')(y)


class Block(nn.Module):
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, name='norm1')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name='attn')(y, y)
    return x + Mlp(self.hidden, name='mlp')(nn.LayerNorm(epsilon=1e-6, name='norm2')(x))


class LinenViT(nn.Module):
  patch: int = 8
  width: int = 32
  depth: int = 2
  heads: int = 2
  hidden: int = 64
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch,) * 2, strides=(self.patch,) * 2, padding='VALID',
                name='patch_embed')(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param('pos', nn.initializers.zeros, (1, h * w + 1, c))
    for i in range(self.depth):
      x = Block(self.heads, self.hidden, name=f'blocks_{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, name='norm')(x)
    return nn.Dense(self.classes, name='head')(x[:, 0])


def vit_params(builtin):
  """Built-in ViT params -> LinenViT params (same maths, other names)."""
  p = builtin['params']
  t = p['Transformer']
  out = {'patch_embed': p['embedding'], 'cls': p['cls'],
         'pos': t['posembed_input']['pos_embedding'], 'norm': t['encoder_norm'],
         'head': p['head']}
  for i in range(2):
    b = t[f'encoderblock_{i}']
    out[f'blocks_{i}'] = {
        'norm1': b['LayerNorm_0'], 'attn': b['MultiHeadDotProductAttention_1'],
        'norm2': b['LayerNorm_2'],
        'mlp': {'fc1': b['MlpBlock_3']['Dense_0'], 'fc2': b['MlpBlock_3']['Dense_1']}}
  return {'params': out}


class Unit(nn.Module):
  """BiT pre-activation bottleneck with plain convs (kernels standardised beforehand)."""
  features: int
  strides: int

  @nn.compact
  def __call__(self, x):
    gn = lambda name: nn.GroupNorm(4, epsilon=1e-5, use_fast_variance=False, name=name)
    pre = nn.relu(gn('gn_a')(x))
    shortcut = x
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      shortcut = nn.Conv(4 * self.features, (1, 1), (self.strides,) * 2, use_bias=False,
                         name='proj')(pre)
    y = nn.Conv(self.features, (1, 1), use_bias=False, name='conv_a')(pre)
    y = nn.Conv(self.features, (3, 3), (self.strides,) * 2, padding=((1, 1), (1, 1)),
                use_bias=False, name='conv_b')(nn.relu(gn('gn_b')(y)))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False, name='conv_c')(nn.relu(gn('gn_c')(y)))
    return y + shortcut


class LinenCNN(nn.Module):
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name='stem')(images)
    for s in range(4):
      x = Unit(8 * 2**s, 1 if s == 0 else 2, name=f'stage{s + 1}')(x)
    x = nn.relu(nn.GroupNorm(4, epsilon=1e-5, use_fast_variance=False, name='norm')(x))
    return nn.Dense(self.classes, name='head')(x.mean(axis=(1, 2)))


def _std(kernel):
  k = np.asarray(kernel, np.float64)
  k = k - k.mean(axis=(0, 1, 2), keepdims=True)
  return (k / np.sqrt((k**2).mean(axis=(0, 1, 2), keepdims=True) + 1e-10)).astype(np.float32)


def cnn_params(builtin):
  """Built-in R-smoke params -> LinenCNN params (weight standardisation folded in)."""
  r = builtin['params']['resnet']
  gn = lambda g: {'scale': g['gamma'], 'bias': g['beta']}
  conv = lambda c: {'kernel': _std(c['standardized_conv2d']['kernel'])}
  out = {'stem': conv(r['root_block']), 'norm': gn(r['group_norm']),
         'head': {'kernel': r['head']['conv2d']['kernel'][0, 0],
                  'bias': r['head']['conv2d']['bias']}}
  for s in range(1, 5):
    u = r[f'block{s}']['unit01']
    out[f'stage{s}'] = {
        'gn_a': gn(u['a']['group_norm']), 'conv_a': conv(u['a']),
        'proj': conv(u['a']['proj']), 'gn_b': gn(u['b']['group_norm']), 'conv_b': conv(u['b']),
        'gn_c': gn(u['c']['group_norm']), 'conv_c': conv(u['c'])}
  return {'params': out}


def _random_variables(model, seed, size=32):
  """Random weights of the shapes `model.init` would make (no jitted init: R-smoke's is slow)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), flax.core.unfreeze(shapes))


# (foreign name, built-in name) pairs that must be the same representation.
VIT_PAIRS = [('patch_embed', None), ('blocks_0/norm1', 'block00/ln0'),
             ('blocks_0/attn', 'block00/sa'), ('blocks_0/mlp/fc1', None),
             ('blocks_0/mlp', 'block00/mlp'), ('blocks_0', 'block00'),
             ('blocks_1/norm2', 'block01/ln2'), ('blocks_1', 'block01'),
             ('norm', 'encoder_norm'), ('head', 'logits'), ('output', 'logits')]
CNN_PAIRS = [('stem', 'root/conv'), ('stage1/proj', 'block1/unit01/proj'),
             ('stage1/conv_a', 'block1/unit01/conv_a'), ('stage1', 'block1/unit01'),
             ('stage2/conv_b', 'block2/unit01/conv_b'), ('stage3', 'block3/unit01'),
             ('stage4', 'block4/unit01'), ('output', 'logits')]


@pytest.fixture(scope='module')
def vit_pair():
  builtin = create_model('ViT-smoke_8', 10)
  variables = _random_variables(builtin, 1)
  return builtin, variables, LinenViT(), vit_params(variables)


@pytest.fixture(scope='module')
def cnn_pair():
  builtin = create_model('R-smoke', 10)
  variables = _random_variables(builtin, 2)
  return builtin, variables, LinenCNN(), cnn_params(variables)


def test_layer_names_in_forward_order(vit_pair):
  _, _, foreign, _ = vit_pair
  names = capture.layer_names(foreign, (32, 32, 3))
  assert names[0] == 'patch_embed' and names[-2:] == ['head', 'output']
  # A block is recorded after its children (calls return inside out).
  assert names.index('blocks_0/norm1') < names.index('blocks_0/attn') < names.index(
      'blocks_0/mlp/fc1') < names.index('blocks_0/mlp') < names.index('blocks_0') < names.index(
          'blocks_1/norm1')
  assert 'blocks_0/attn/query' in names  # Flax's own submodules of the attention layer
  assert describe(foreign).family == 'other' and capture.uses_interception(foreign, (32, 32, 3))
  assert not capture.uses_interception(create_model('ViT-smoke_8', 10), (32, 32, 3))
  with pytest.raises(KeyError, match="close matches: \\['blocks_0/mlp"):
    capture.select(names, 'blocks_0/mpl')


@pytest.mark.parametrize('pairs_fixture, pairs', [('vit_pair', VIT_PAIRS),
                                                  ('cnn_pair', CNN_PAIRS)])
def test_same_activations_through_interception(pairs_fixture, pairs, request):
  builtin, variables, foreign, foreign_vars = request.getfixturevalue(pairs_fixture)
  images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  got = capture.capture(foreign, foreign_vars, images, [f for f, _ in pairs])
  assert list(got) == [f for f, _ in pairs]  # forward order
  ref = capture.capture(builtin, variables, images, [b for _, b in pairs if b])
  for f, b in pairs:
    if b:
      np.testing.assert_allclose(got[f], ref[b], rtol=1e-4, atol=1e-4, err_msg=f)


@pytest.mark.parametrize('pairs_fixture, pairs', [('vit_pair', VIT_PAIRS),
                                                  ('cnn_pair', CNN_PAIRS)])
def test_same_cka_grid_and_plan(pairs_fixture, pairs, request):
  builtin, variables, foreign, foreign_vars = request.getfixturevalue(pairs_fixture)
  pairs = [p for p in pairs if p[1] and p[0] != 'output']
  f_fn = jax.jit(capture.make_capture_fn(foreign, [f for f, _ in pairs]))
  b_fn = jax.jit(capture.make_capture_fn(builtin, [b for _, b in pairs]))
  state_f = cka.init([f for f, _ in pairs])
  state_b = cka.init([b for _, b in pairs])
  for seed in range(3):
    images = jax.random.normal(jax.random.key(10 + seed), (8, 32, 32, 3))
    state_f = cka.update(state_f, f_fn(foreign_vars, images))
    state_b = cka.update(state_b, b_fn(variables, images))
  grid_f, grid_b = cka.result(state_f).cka, cka.result(state_b).cka
  assert grid_f.shape == (len(pairs),) * 2
  np.testing.assert_allclose(grid_f, grid_b, atol=1e-4)
  # Memory planning sees the same shapes as the built-in's `out`.
  plan_f = capture.plan_bytes(foreign, (32, 32, 3), 16, [f for f, _ in pairs])
  plan_b = capture.plan_bytes(builtin, (32, 32, 3), 16, [b for _, b in pairs])
  assert list(plan_f.values()) == list(plan_b.values())
  gram = lambda x: (f := x.reshape(x.shape[0], -1)) @ f.T
  reduced = capture.plan_bytes(foreign, (32, 32, 3), 16, [f for f, _ in pairs], gram)
  assert set(reduced.values()) == {16 * 16 * 4}  # in-jit reduction planned on its output


class Twice(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3, name='shared')
    y = dense(x.reshape(x.shape[0], -1)[:, :3])
    return dense(y), y


def test_repeated_calls_and_tuple_outputs():
  names = capture.layer_names(Twice(), (2, 2, 3))
  assert names == ['shared', 'shared@1', 'output/0', 'output/1']


class WithTrain(nn.Module):
  """Takes `train` (dropout) but returns plain logits: intercepted, called with train=False."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(4, name='fc')(x.reshape(len(x), -1)))
    return nn.Dense(2, name='head')(x)


def test_module_with_train_argument():
  model = WithTrain()
  assert capture.uses_interception(model, (2, 2, 3))
  x = jnp.ones((3, 2, 2, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  got = capture.capture(model, variables, x, ['fc', 'output'])
  np.testing.assert_allclose(got['output'], model.apply(variables, x, train=False), rtol=1e-6)
