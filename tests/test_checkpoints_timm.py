"""timm safetensors -> ViT: files written from timm's key list, checked against float64 NumPy.

The state dicts are built here from timm's own names and shapes (written out below, not taken
from vit_analysis.models.checkpoints_timm), and the reference forward pass re-implements timm's
`VisionTransformer.forward_features` / `forward_head` and `Block` in float64.
"""
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

from vit_analysis.models import capture, checkpoints, create_model, describe

TINY = {'hidden_size': 32, 'num_layers': 2, 'num_heads': 2, 'mlp_dim': 64}


def timm_state(rng, *, width=32, depth=2, patch=8, mlp=64, grid_tokens=16, cls=True, reg=0,
               no_embed_class=False, layerscale=False, pre_norm=False, fc_norm=False,
               embed_bias=True, classes=5, embed_scale=1.0):
  """A random timm VisionTransformer state dict (names and shapes as timm writes them).

  `embed_scale` shrinks the embedded tokens so that their variance is comparable to the
  LayerNorm epsilon of `norm_pre`, which makes eps 1e-5 vs 1e-6 visible in the output.
  """
  d = width
  w = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  e = lambda *shape: (w(*shape) * embed_scale).astype(np.float32)
  sd = {'patch_embed.proj.weight': e(d, 3, patch, patch)}
  if embed_bias:
    sd['patch_embed.proj.bias'] = e(d)
  if cls:
    sd['cls_token'] = e(1, 1, d)
  if reg:
    sd['reg_token'] = e(1, reg, d)
  sd['pos_embed'] = e(1, grid_tokens + (0 if no_embed_class else int(cls) + reg), d)
  norm = lambda name: {f'{name}.weight': 1 + w(d), f'{name}.bias': w(d)}
  if pre_norm:
    sd.update(norm('norm_pre'))
  for i in range(depth):
    b = f'blocks.{i}'
    sd.update(norm(f'{b}.norm1'))
    sd.update({f'{b}.attn.qkv.weight': w(3 * d, d), f'{b}.attn.qkv.bias': w(3 * d),
               f'{b}.attn.proj.weight': w(d, d), f'{b}.attn.proj.bias': w(d)})
    sd.update(norm(f'{b}.norm2'))
    sd.update({f'{b}.mlp.fc1.weight': w(mlp, d), f'{b}.mlp.fc1.bias': w(mlp),
               f'{b}.mlp.fc2.weight': w(d, mlp), f'{b}.mlp.fc2.bias': w(d)})
    if layerscale:
      sd[f'{b}.ls1.gamma'] = 1 + w(d)
      sd[f'{b}.ls2.gamma'] = 1 + w(d)
  sd.update(norm('fc_norm' if fc_norm else 'norm'))
  if classes:
    sd['head.weight'] = w(classes, d)
    sd['head.bias'] = w(classes)
  return sd


def _ln(x, sd, name, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[f'{name}.weight'] + sd[f'{name}.bias']


def timm_forward(sd, images_nhwc, *, heads=2, eps=1e-6, act='gelu', pool='token', cls=True,
                 reg=0, no_embed_class=False, pos_embed=None):
  """float64 timm forward: returns (logits, [block outputs])."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  if pos_embed is not None:
    sd['pos_embed'] = np.asarray(pos_embed, np.float64)
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)  # timm is NCHW
  wt = sd['patch_embed.proj.weight']
  d, _, p, _ = wt.shape
  b, _, hh, ww = x.shape
  gh, gw = hh // p, ww // p
  patches = x.reshape(b, 3, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # [b, gh, gw, 3, p, p]
  t = np.einsum('bijcuv,dcuv->bijd', patches, wt).reshape(b, gh * gw, d)
  t = t + sd.get('patch_embed.proj.bias', 0.0)
  prefix = []
  if cls:
    prefix.append(np.broadcast_to(sd['cls_token'], (b, 1, d)))
  if reg:
    prefix.append(np.broadcast_to(sd['reg_token'], (b, reg, d)))
  if no_embed_class:
    t = np.concatenate(prefix + [t + sd['pos_embed']], axis=1)
  else:
    t = np.concatenate(prefix + [t], axis=1) + sd['pos_embed']
  if 'norm_pre.weight' in sd:
    t = _ln(t, sd, 'norm_pre', eps)
  activation = {'gelu': lambda z: 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2))),
                'quick_gelu': lambda z: z / (1 + np.exp(-1.702 * z))}[act]
  outputs = []
  depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
  for i in range(depth):
    pre = f'blocks.{i}'
    y = _ln(t, sd, f'{pre}.norm1', eps)
    qkv = y @ sd[f'{pre}.attn.qkv.weight'].T + sd[f'{pre}.attn.qkv.bias']
    n = t.shape[1]
    qkv = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [b, H, n, hd]
    logits = q @ k.transpose(0, 1, 3, 2) * (d // heads)**-0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    o = o @ sd[f'{pre}.attn.proj.weight'].T + sd[f'{pre}.attn.proj.bias']
    t = t + o * sd.get(f'{pre}.ls1.gamma', 1.0)
    y = _ln(t, sd, f'{pre}.norm2', eps)
    y = activation(y @ sd[f'{pre}.mlp.fc1.weight'].T + sd[f'{pre}.mlp.fc1.bias'])
    y = y @ sd[f'{pre}.mlp.fc2.weight'].T + sd[f'{pre}.mlp.fc2.bias']
    t = t + y * sd.get(f'{pre}.ls2.gamma', 1.0)
    outputs.append(t)
  if 'norm.weight' in sd:
    t = _ln(t, sd, 'norm', eps)
  pooled = t[:, 0] if pool == 'token' else t[:, int(cls) + reg:].mean(1)
  if 'fc_norm.weight' in sd:
    pooled = _ln(pooled, sd, 'fc_norm', eps)
  if 'head.weight' in sd:
    pooled = pooled @ sd['head.weight'].T + sd['head.bias']
  return pooled, outputs


# (registry name, create_model overrides, timm_state kwargs, timm_forward kwargs, image size)
CASES = {
    'supervised_exact_gelu': ('timm:vit_base_patch16_224.augreg_in21k', {'patch_size': 8}, {},
                              {}, 32),
    'deit': ('timm:deit_small_patch16_224', {'patch_size': 8}, {}, {}, 32),
    'dinov2_layerscale_patch14': ('timm:vit_small_patch14_dinov2.lvd142m', {'image_size': 28},
                                  {'patch': 14, 'grid_tokens': 4, 'layerscale': True}, {}, 28),
    'registers': ('timm:vit_base_patch14_reg4_dinov2', {'image_size': 28},
                  {'patch': 14, 'grid_tokens': 4, 'layerscale': True, 'reg': 4,
                   'no_embed_class': True}, {'reg': 4, 'no_embed_class': True}, 28),
    'clip_norm_pre': ('timm:vit_base_patch16_clip_224.openai', {'patch_size': 8},
                      {'pre_norm': True, 'embed_bias': False, 'embed_scale': 3e-3},
                      {'eps': 1e-5}, 32),
    'clip_quickgelu': ('timm:vit_base_patch16_clip_quickgelu_224', {'patch_size': 8},
                       {'pre_norm': True, 'embed_bias': False, 'embed_scale': 3e-3},
                       {'eps': 1e-5, 'act': 'quick_gelu'}, 32),
    'gap_fc_norm': ('timm:vit_base_patch16_224.mae',
                    {'patch_size': 8, 'classifier': 'gap', 'class_token': True, 'fc_norm': True},
                    {'fc_norm': True}, {'pool': 'avg'}, 32),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_timm_checkpoint_matches_float64_reference(case, tmp_path):
  name, overrides, state_kw, forward_kw, size = CASES[case]
  rng = np.random.default_rng(len(case))
  sd = timm_state(rng, **state_kw)
  path = tmp_path / 'model.safetensors'
  safetensors.numpy.save_file(sd, str(path))
  model = create_model(name, 5, **{**TINY, 'image_size': size, **overrides})
  variables = checkpoints.load_safetensors(path, model)
  images = rng.normal(0, 1, (2, size, size, 3)).astype(np.float32)
  feats = capture.capture(model, variables, images, ['block??', 'logits'])
  ref_logits, ref_blocks = timm_forward(sd, images, **forward_kw)
  np.testing.assert_allclose(feats['logits'], ref_logits, rtol=1e-5, atol=2e-5)
  for i, ref in enumerate(ref_blocks):
    np.testing.assert_allclose(feats[f'block{i:02d}'], ref, rtol=1e-5, atol=2e-5)


def _bilinear_corner_aligned(grid, new_side):
  """[g, g, D] -> [new, new, D]: output i samples input at i * (g - 1) / (new - 1)."""
  g = grid.shape[0]
  coords = np.arange(new_side) * (g - 1) / (new_side - 1)
  lo = np.floor(coords).astype(int).clip(0, g - 2)
  frac = coords - lo
  rows = grid[lo] * (1 - frac)[:, None, None] + grid[lo + 1] * frac[:, None, None]
  return rows[:, lo] * (1 - frac)[None, :, None] + rows[:, lo + 1] * frac[None, :, None]


@pytest.mark.parametrize('registers', [0, 4])
def test_posemb_resize_from_a_larger_grid(registers, tmp_path):
  # The file is built for 56 px (4x4 grid of 14 px patches), the model for 28 px (2x2), as
  # DINOv2's 518 px (37x37) files are used at 224 px.
  rng = np.random.default_rng(3)
  kw = {'reg': registers, 'no_embed_class': bool(registers)}
  sd = timm_state(rng, patch=14, grid_tokens=16, layerscale=True, **kw)
  safetensors.numpy.save_file(sd, str(tmp_path / 'm.safetensors'))
  name = 'timm:vit_base_patch14_reg4_dinov2' if registers else 'timm:vit_base_patch14_dinov2'
  model = create_model(name, 5, **TINY, image_size=28)
  variables = checkpoints.load_safetensors(tmp_path / 'm.safetensors', model)
  pos = sd['pos_embed'].astype(np.float64)
  prefix = 0 if registers else 1
  grid = _bilinear_corner_aligned(pos[0, prefix:].reshape(4, 4, -1), 2).reshape(1, 4, -1)
  expected = np.concatenate([pos[:, :prefix], grid], axis=1)
  got = variables['params']['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  images = rng.normal(0, 1, (2, 28, 28, 3)).astype(np.float32)
  logits, _ = model.apply(variables, images)
  ref, _ = timm_forward(sd, images, pos_embed=expected, **kw)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=2e-5)


def test_every_mismatch_is_named_at_once(tmp_path):
  rng = np.random.default_rng(0)
  sd = timm_state(rng)
  del sd['blocks.1.mlp.fc2.bias']
  sd['blocks.0.attn.proj.weight'] = sd['blocks.0.attn.proj.weight'][:, :16]
  sd['mask_token'] = np.zeros((1, 32), np.float32)
  sd['reg_token'] = np.zeros((1, 4, 32), np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / 'bad.safetensors'))
  model = create_model('timm:vit_base_patch16_224', 5, **TINY, patch_size=8, image_size=32)
  with pytest.raises(ValueError) as e:
    checkpoints.load_safetensors(tmp_path / 'bad.safetensors', model)
  msg = str(e.value)
  for part in ('missing in file (1): blocks.1.mlp.fc2.bias', 'unexpected in file (2): mask_token',
               'reg_token', 'num_registers=4',
               ('shape mismatch (1): blocks.0.attn.proj.weight: file (32, 16) vs '
                'model (32, 32)')):
    assert part in msg, (part, msg)


def test_heads_and_fresh_head(tmp_path):
  rng = np.random.default_rng(1)
  sd = timm_state(rng, classes=0)  # self-supervised weights: no head
  safetensors.numpy.save_file(sd, str(tmp_path / 'ssl.safetensors'))
  kw = {**TINY, 'patch_size': 8, 'image_size': 32}
  with pytest.raises(ValueError, match='no head'):
    checkpoints.load_safetensors(tmp_path / 'ssl.safetensors',
                                 create_model('timm:vit_base_patch16_224.dino', 5, **kw))
  model = create_model('timm:vit_base_patch16_224.dino', 0, **kw)
  images = rng.normal(0, 1, (1, 32, 32, 3)).astype(np.float32)
  logits, _ = model.apply(checkpoints.load_safetensors(tmp_path / 'ssl.safetensors', model),
                            images)
  np.testing.assert_allclose(logits, timm_forward(sd, images)[0], rtol=1e-5, atol=2e-5)
  fresh = create_model('timm:vit_base_patch16_224.dino', 7, **kw)
  v = checkpoints.load_safetensors(tmp_path / 'ssl.safetensors', fresh, fresh_head=True)
  assert np.all(np.asarray(v['params']['head']['kernel']) == 0)
  assert v['params']['head']['kernel'].shape == (32, 7)


@pytest.mark.parametrize('name, normalization', [
    ('timm:vit_base_patch16_224.augreg_in21k', 'minus_one_one'),
    ('timm:vit_base_patch16_224.dino', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ('timm:vit_base_patch16_224.mae', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ('timm:deit_base_patch16_224', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ('timm:vit_small_patch14_dinov2', ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ('timm:vit_base_patch16_clip_224.openai',
     ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))),
    ('timm:vit_large_patch14_clip_224.laion2b', 'minus_one_one'),
    ('timm:vit_base_patch16_224.anything', 'minus_one_one'),
])
def test_registry_normalization(name, normalization):
  assert describe(create_model(name, 0)).normalization == normalization


def test_registry_architectures():
  # Without a head (timm `num_classes=0`): ViT-B/16 has 86,567,656 - 769,000 (the 1000-way
  # head) = 85,798,656. DINOv2 ViT-B/14 at 518 px: patch conv 768*3*14*14 + 768, CLS 768,
  # pos 1370*768, 12 blocks of 7,087,872 + LayerScale 2*768, final norm 2*768 = 86,579,712.
  counts = {'timm:vit_base_patch16_224': 85_798_656,
            'timm:vit_base_patch14_dinov2': 86_579_712,
            'timm:vit_base_patch14_reg4_dinov2': 86_579_712 - 768 + 4 * 768,
            'timm:vit_base_patch16_clip_224': 85_798_656 - 768 + 2 * 768}
  for name, count in counts.items():
    shapes = checkpoints.param_shapes(create_model(name, 0))
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == count, name
  info = describe(create_model('timm:vit_base_patch14_reg4_dinov2', 0))
  assert (info.num_prefix_tokens, info.grid, info.patch_size) == (5, (37, 37), 14)
  with pytest.raises(KeyError, match='vit_base_patch16_224'):
    create_model('timm:vit_base_patch16_225', 0)
