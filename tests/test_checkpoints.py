"""Official npz checkpoints: layouts from independent key lists, traps, resize, round trip."""
import os

import flax
import jax
import numpy as np
import pytest

# float64 NumPy BiT forward and the BiT key list (tests/ is on sys.path under pytest).
from test_models_resnet import _official_keys as bit_keys
from test_models_resnet import fast_jit, np_resnet

from vit_analysis.models import checkpoints, create_model
from vit_analysis.models.resnet import VARIANTS as RESNET_VARIANTS
from vit_analysis.models.resnet import ResNetV2


def vit_keys(patch, width, depth, mlp, heads, grid, num_classes, cls=True, rep=None):
  """ViT npz layout of docs/method.md#checkpoint-formats (pre-linen names), written independently of the model."""
  dh = width // heads
  keys = {'embedding/kernel': (patch, patch, 3, width), 'embedding/bias': (width,),
          'Transformer/posembed_input/pos_embedding': (1, grid * grid + int(cls), width)}
  if cls:
    keys['cls'] = (1, 1, width)
  for i in range(depth):
    b = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      keys[f'{b}/{ln}/scale'] = keys[f'{b}/{ln}/bias'] = (width,)
    for qkv in ('query', 'key', 'value'):
      keys[f'{b}/MultiHeadDotProductAttention_1/{qkv}/kernel'] = (width, heads, dh)
      keys[f'{b}/MultiHeadDotProductAttention_1/{qkv}/bias'] = (heads, dh)
    keys[f'{b}/MultiHeadDotProductAttention_1/out/kernel'] = (heads, dh, width)
    keys[f'{b}/MultiHeadDotProductAttention_1/out/bias'] = (width,)
    keys[f'{b}/MlpBlock_3/Dense_0/kernel'] = (width, mlp)
    keys[f'{b}/MlpBlock_3/Dense_0/bias'] = (mlp,)
    keys[f'{b}/MlpBlock_3/Dense_1/kernel'] = (mlp, width)
    keys[f'{b}/MlpBlock_3/Dense_1/bias'] = (width,)
  keys['Transformer/encoder_norm/scale'] = keys['Transformer/encoder_norm/bias'] = (width,)
  if rep:
    keys['pre_logits/kernel'], keys['pre_logits/bias'] = (width, rep), (rep,)
  keys['head/kernel'], keys['head/bias'] = (rep or width, num_classes), (num_classes,)
  return keys


def mixer_keys(patch, width, blocks, tok, ch, tokens, num_classes):
  """Mixer npz layout of docs/method.md#checkpoint-formats."""
  keys = {'stem/kernel': (patch, patch, 3, width), 'stem/bias': (width,)}
  for i in range(blocks):
    b = f'MixerBlock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      keys[f'{b}/{ln}/scale'] = keys[f'{b}/{ln}/bias'] = (width,)
    for mix, n, hidden in (('token_mixing', tokens, tok), ('channel_mixing', width, ch)):
      keys[f'{b}/{mix}/Dense_0/kernel'], keys[f'{b}/{mix}/Dense_0/bias'] = (n, hidden), (hidden,)
      keys[f'{b}/{mix}/Dense_1/kernel'], keys[f'{b}/{mix}/Dense_1/bias'] = (hidden, n), (n,)
  keys['pre_head_layer_norm/scale'] = keys['pre_head_layer_norm/bias'] = (width,)
  keys['head/kernel'], keys['head/bias'] = (width, num_classes), (num_classes,)
  return keys


def random_file(keys, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in keys.items():
    if k.endswith(('scale', 'gamma')):
      out[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[k] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def write(tmp_path, name, arrays, prefix=''):
  path = os.path.join(tmp_path, name)
  np.savez(path, **{prefix + k: v for k, v in arrays.items()})  # the files' own writer
  return path


def images(size, seed=1, n=2):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def logits_fn(model, variables, x):
  """One compiled forward, reused for both param sets (same shapes, same executable)."""
  return fast_jit(lambda v, x: model.apply(v, x, train=False)[0], variables, x)


def unflatten(arrays):
  return {'params': flax.traverse_util.unflatten_dict(arrays, sep='/')}


# ViT-smoke_8: patch 8, width 32, 2 blocks, MLP 64, 2 heads; 32 px -> 4x4 grid.
SMOKE_VIT = dict(patch=8, width=32, depth=2, mlp=64, heads=2)


@pytest.mark.parametrize('name,cls,rep,prefix', [
    # ImageNet-21k style pre_logits layer, big_vision export prefix.
    ('ViT-smoke_8', True, 16, 'opt/target/'),
    ('ViT-smoke_8-gap', False, None, ''),  # GAP: no 'cls', 16 tokens
])
def test_vit_official_layout_loads(tmp_path, name, cls, rep, prefix):
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7, cls=cls, rep=rep))
  path = write(tmp_path, 'vit.npz', arrays, prefix)
  model = create_model(name, 7, representation_size=rep)
  variables = checkpoints.load_npz(path, model)
  x = images(32)
  forward = logits_fn(model, variables, x)
  logits = forward(variables, x)
  np.testing.assert_array_equal(logits, forward(unflatten(arrays), x))
  assert np.abs(logits).max() > 1e-2
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  assert set(flat) == set(arrays)
  for k, v in arrays.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)


def test_mixer_official_layout_loads(tmp_path):
  arrays = random_file(mixer_keys(8, 32, 2, 16, 64, tokens=16, num_classes=5))
  model = create_model('Mixer-smoke_8', 5)
  variables = checkpoints.load_npz(write(tmp_path, 'mixer.npz', arrays), model)
  x = images(32)
  forward = logits_fn(model, variables, x)
  logits = forward(variables, x)
  np.testing.assert_array_equal(logits, forward(unflatten(arrays), x))
  assert np.abs(logits).max() > 1e-2
  # Mixer cannot change resolution: 64 px would need 64 tokens.
  with pytest.raises(ValueError, match='token count'):
    checkpoints.load_npz(write(tmp_path, 'mixer.npz', arrays), model, image_size=64)


def test_bit_official_layout_matches_float64_numpy_and_squeezes_groupnorm(tmp_path):
  kw = dict(RESNET_VARIANTS['R-smoke'], block_units=(2, 1))
  arrays = random_file(bit_keys(kw['block_units'], 1, width=kw['width'], num_classes=5, root=3))
  # Old GroupNorm params were stored as (1, 1, 1, C) (vit_jax `_fix_groupnorm`).
  old = dict(arrays)
  for k in ('resnet/block1/unit01/a/group_norm/gamma', 'resnet/group_norm/beta'):
    old[k] = arrays[k].reshape(1, 1, 1, -1)
  model = ResNetV2(**kw, num_classes=5)
  variables = checkpoints.load_npz(write(tmp_path, 'bit.npz', old), model, image_size=16)
  x = images(16)
  logits = fast_jit(model.apply, variables, x)(variables, x)[0]
  ref, _ = np_resnet({k: v.astype(np.float64) for k, v in arrays.items()}, x,
                     kw['block_units'], kw['num_groups'], small_stem=True)
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  assert np.abs(ref).max() > 0.1


def test_save_load_round_trip_exact(tmp_path):
  keys = vit_keys(**SMOKE_VIT, grid=4, num_classes=3)
  params = unflatten(random_file(keys, seed=5))
  path = os.path.join(tmp_path, 'rt.npz')
  checkpoints.save_npz(jax.tree.map(jax.numpy.asarray, params), path)
  with np.load(path) as f:  # the official flat layout
    assert sorted(f.files) == sorted(keys)
  model = create_model('ViT-smoke_8', 3)
  loaded = checkpoints.load_npz(path, model)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # Saving what was loaded and loading again is exact too.
  checkpoints.save_npz(loaded['params'], path)
  jax.tree.map(np.testing.assert_array_equal, checkpoints.load_npz(path, model), params)


def test_save_is_atomic_on_error(tmp_path):
  path = os.path.join(tmp_path, 'bad.npz')
  with pytest.raises(ValueError, match='b/c'):
    checkpoints.save_npz({'a': np.zeros(3), 'b': {'c': np.array(['x'])}}, path)
  assert os.listdir(tmp_path) == []
  checkpoints.save_npz({'a': np.ones(3)}, path)
  with pytest.raises(ValueError):
    checkpoints.save_npz({'a': np.zeros(3), 'b': {'c': np.array(['x'])}}, path)
  with np.load(path) as f:  # the previous file is untouched
    assert f.files == ['a'] and f['a'].sum() == 3
  assert os.listdir(tmp_path) == ['bad.npz']


def test_every_problem_reported_at_once(tmp_path):
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7))
  del arrays['Transformer/encoderblock_1/LayerNorm_2/scale']
  del arrays['embedding/bias']
  arrays['Transformer/encoderblock_1/MlpBlock_3/Dense_2/kernel'] = np.zeros((2, 2), np.float32)
  arrays['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'] = np.zeros((32, 65), np.float32)
  arrays['Transformer/encoder_norm/scale'] = np.zeros((31,), np.float32)
  arrays['Transformer/encoderblock_0/LayerNorm_0/bias'][3] = np.nan
  with pytest.raises(ValueError) as e:
    checkpoints.load_npz(write(tmp_path, 'bad.npz', arrays), create_model('ViT-smoke_8', 7))
  msg = str(e.value)
  for name in ['missing in file (2): Transformer/encoderblock_1/LayerNorm_2/scale',
               'missing in file (2): embedding/bias',
               'unexpected in file (1): Transformer/encoderblock_1/MlpBlock_3/Dense_2/kernel',
               'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel: file (32, 65) vs '
               'model (32, 64)',
               'Transformer/encoder_norm/scale: file (31,) vs model (32,)',
               'non-finite values: Transformer/encoderblock_0/LayerNorm_0/bias']:
    assert name in msg, (name, msg)


def test_classifier_and_pre_logits_mismatches_explained(tmp_path):
  gap = write(tmp_path, 'gap.npz', random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7,
                                                          cls=False)))
  with pytest.raises(ValueError, match=r"(?s)no 'cls'.*GAP.*missing in file \(1\): cls"):
    checkpoints.load_npz(gap, create_model('ViT-smoke_8', 7))
  with pytest.raises(ValueError, match=r"CLS-token model"):
    checkpoints.load_npz(write(tmp_path, 'cls.npz', random_file(
        vit_keys(**SMOKE_VIT, grid=4, num_classes=7))), create_model('ViT-smoke_8-gap', 7))
  rep = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7, rep=16))
  path = write(tmp_path, 'rep.npz', rep)
  with pytest.raises(ValueError, match='representation_size=16'):
    checkpoints.load_npz(path, create_model('ViT-smoke_8', 7))
  with pytest.raises(ValueError, match='representation_size=None'):
    checkpoints.load_npz(gap, create_model('ViT-smoke_8-gap', 7, representation_size=16))
  # Dropping the representation layer only makes sense with a new head.
  model = create_model('ViT-smoke_8', 3)
  loaded = checkpoints.load_npz(path, model, drop_pre_logits=True, fresh_head=True)
  flat = flax.traverse_util.flatten_dict(loaded['params'], sep='/')
  assert not any(k.startswith('pre_logits') for k in flat)
  np.testing.assert_array_equal(flat['cls'], rep['cls'])


def test_fresh_head_when_num_classes_differs(tmp_path):
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7))
  path = write(tmp_path, 'vit.npz', arrays)
  model = create_model('ViT-smoke_8', 5)
  with pytest.raises(ValueError, match='num_classes=7 or pass fresh_head=True'):
    checkpoints.load_npz(path, model)
  flat = flax.traverse_util.flatten_dict(
      checkpoints.load_npz(path, model, fresh_head=True)['params'], sep='/')
  assert flat['head/kernel'].shape == (32, 5) and not np.any(flat['head/kernel'])
  assert flat['head/bias'].shape == (5,) and not np.any(flat['head/bias'])
  for k, v in arrays.items():
    if not k.startswith('head/'):
      np.testing.assert_array_equal(flat[k], v, err_msg=k)
  # A headless model (features only) drops the file's head.
  headless = checkpoints.load_npz(path, create_model('ViT-smoke_8', None), fresh_head=True)
  assert 'head' not in headless['params']
  # BiT head keys live under resnet/head/conv2d.
  kw = dict(RESNET_VARIANTS['R-smoke'], block_units=(1,))
  bit = random_file(bit_keys((1,), 1, width=kw['width'], num_classes=21843, root=3))
  flat = flax.traverse_util.flatten_dict(checkpoints.load_npz(
      bit, ResNetV2(**kw, num_classes=4), image_size=16, fresh_head=True)['params'], sep='/')
  assert flat['resnet/head/conv2d/kernel'].shape == (1, 1, 32, 4)
  assert not np.any(flat['resnet/head/conv2d/kernel'])


def ramp_posemb(grid, cls):
  """[1, cls + grid^2, 3]: channel 0 = row, 1 = column, 2 = constant; CLS entry = -5."""
  r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  g = np.stack([r, c, np.full_like(r, 7)], -1).reshape(1, grid * grid, 3).astype(np.float32)
  return np.concatenate([np.full((1, 1, 3), -5, np.float32), g], 1) if cls else g


@pytest.mark.parametrize('g_old,g_new,cls', [(7, 14, True), (24, 14, True), (24, 14, False)])
def test_resize_posemb_closed_form(g_old, g_new, cls):
  out = checkpoints.resize_posemb(ramp_posemb(g_old, cls), g_new**2 + cls, int(cls))
  assert out.shape == (1, g_new**2 + cls, 3) and out.dtype == np.float32
  if cls:
    np.testing.assert_array_equal(out[0, 0], [-5, -5, -5])
  grid = out[0, int(cls):].reshape(g_new, g_new, 3)
  # docs/method.md#position-embedding-resize: corner-aligned, output i reads input i (g_old - 1) / (g_new - 1)
  # (7 -> 14: i * 6/13; 24 -> 14: i * 23/13).
  i = np.arange(g_new) * (g_old - 1) / (g_new - 1)
  np.testing.assert_allclose(grid[:, :, 0], np.broadcast_to(i[:, None], (g_new, g_new)),
                             atol=1e-5)
  np.testing.assert_allclose(grid[:, :, 1], np.broadcast_to(i[None, :], (g_new, g_new)),
                             atol=1e-5)
  np.testing.assert_allclose(grid[:, :, 2], 7, atol=1e-5)
  with pytest.raises(ValueError, match='square'):
    checkpoints.resize_posemb(ramp_posemb(g_old, cls), 15 + cls, int(cls))


@pytest.mark.parametrize('name,cls', [('ViT-smoke_8', True), ('ViT-smoke_8-gap', False)])
def test_load_resizes_posemb_to_model_resolution(tmp_path, name, cls):
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7, cls=cls))
  pe = np.tile(ramp_posemb(4, cls), (1, 1, 11))[:, :, :32]  # width 32
  arrays['Transformer/posembed_input/pos_embedding'] = pe
  path = write(tmp_path, 'vit.npz', arrays)
  model = create_model(name, 7, image_size=56)  # 7x7 grid
  loaded = checkpoints.load_npz(path, model)
  got = np.asarray(loaded['params']['Transformer']['posembed_input']['pos_embedding'])
  assert got.shape == (1, 49 + cls, 32)
  if cls:
    np.testing.assert_array_equal(got[0, 0], pe[0, 0])
  grid = got[0, int(cls):].reshape(7, 7, 32)
  i = np.arange(7) * 3 / 6  # 4 -> 7 reads input i * 3/6
  np.testing.assert_allclose(grid[:, :, 0], np.broadcast_to(i[:, None], (7, 7)), atol=1e-6)
  np.testing.assert_allclose(grid[:, :, 1], np.broadcast_to(i[None, :], (7, 7)), atol=1e-6)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[0], loaded, images(56, n=1))
  assert logits.shape == (1, 7)
  with pytest.raises(ValueError, match='resize_posemb_ok'):
    checkpoints.load_npz(path, model, resize_posemb_ok=False)


def _shapes_only(keys):
  """Zero-memory arrays with the right shapes (inspect_npz reads shapes only)."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in keys.items()}


def test_inspect_npz_names_official_layouts():
  b16 = _shapes_only(vit_keys(16, 768, 12, 3072, 12, grid=14, num_classes=21843, rep=768))
  assert checkpoints.inspect_npz(b16) == {
      'name': 'ViT-B_16', 'num_classes': 21843, 'representation_size': 768, 'image_size': 224}
  b32 = _shapes_only(vit_keys(32, 768, 12, 3072, 12, grid=12, num_classes=1000, cls=False))
  b32 = {'opt/target/' + k: v for k, v in b32.items()}
  assert checkpoints.inspect_npz(b32) == {
      'name': 'ViT-B_32-gap', 'num_classes': 1000, 'representation_size': None,
      'image_size': 384}
  mixer = _shapes_only(mixer_keys(16, 768, 12, 384, 3072, tokens=196, num_classes=1000))
  assert checkpoints.inspect_npz(mixer)['name'] == 'Mixer-B_16'
  assert checkpoints.inspect_npz(mixer)['image_size'] == 224
  bit = _shapes_only(bit_keys((3, 8, 36, 3), 2, num_classes=21843))
  assert checkpoints.inspect_npz(bit) == {
      'name': 'R152x2', 'num_classes': 21843, 'representation_size': None, 'image_size': None}
  with pytest.raises(ValueError, match='unknown checkpoint layout'):
    checkpoints.inspect_npz({'foo/kernel': np.zeros(2)})
