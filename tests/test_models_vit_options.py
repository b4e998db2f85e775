"""ViT options beyond vit_jax: parameter trees, `out` names and option checks.

The maths of each option is checked against float64 NumPy in test_checkpoints_timm.py (timm
families) and test_checkpoints_big_vision.py (MAP head, sincos2d); here: what each option adds
to the parameters and to `out`, and that invalid combinations fail early with a clear message.
"""
import jax
import jax.numpy as jnp
import pytest

from vit_analysis.models import capture, checkpoints, create_model


def _keys(model):
  return set(checkpoints.param_shapes(model))


def test_default_vit_param_tree_is_vit_jax():
  base = _keys(create_model('ViT-smoke_8', 10))
  assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in base
  assert not any(k.split('/')[-1] in ('ls1', 'ls2') or 'norm_pre' in k or 'fc_norm' in k
                 or k.startswith(('reg', 'MAPHead')) for k in base)


@pytest.mark.parametrize('overrides, added, removed', [
    ({'layerscale_init': 1e-5}, {'Transformer/encoderblock_0/ls1',
                                 'Transformer/encoderblock_1/ls2'}, set()),
    ({'num_registers': 4}, {'reg'}, set()),
    ({'pre_norm': True, 'embedding_bias': False},
     {'Transformer/norm_pre/scale', 'Transformer/norm_pre/bias'}, {'embedding/bias'}),
    ({'classifier': 'gap', 'class_token': True, 'fc_norm': True}, {'fc_norm/scale', 'fc_norm/bias'},
     {'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias'}),
    ({'classifier': 'map', 'posemb_prefix': False}, {'MAPHead_0/probe'}, {'cls'}),
    ({'classifier': 'gap', 'posemb': 'sincos2d', 'posemb_prefix': False}, set(),
     {'cls', 'Transformer/posembed_input/pos_embedding'}),
])
def test_option_parameters(overrides, added, removed):
  base = _keys(create_model('ViT-smoke_8', 10))
  keys = _keys(create_model('ViT-smoke_8', 10, **overrides))
  assert added <= keys - base and removed <= base - keys


def test_out_names_and_token_counts():
  model = create_model('ViT-smoke_8', 10, num_registers=4, classifier='gap', class_token=True,
                       fc_norm=True, pre_norm=True, posemb_prefix=False)
  shapes = capture.layer_shapes(model, (32, 32, 3))
  names = list(shapes)
  assert names[:2] == ['embedding', 'norm_pre'] and 'encoder_norm' not in names
  assert names[-3:] == ['fc_norm', 'pre_logits', 'logits']
  assert shapes['block00'].shape == (1, 1 + 4 + 16, 32)
  assert shapes['block00/attn_weights'].shape == (1, 2, 21, 21)
  assert checkpoints.param_shapes(model)['Transformer/posembed_input/pos_embedding'].shape == (
      1, 16, 32)
  mapped = capture.layer_shapes(create_model('ViT-smoke_8', 10, classifier='map'), (32, 32, 3))
  assert mapped['map'].shape == (1, 32) and list(mapped)[-3:] == ['map', 'pre_logits', 'logits']


@pytest.mark.parametrize('overrides, match', [
    ({'classifier': 'token', 'class_token': False}, 'needs a class token'),
    ({'classifier': 'avg'}, 'classifier must be one of'),
    ({'posemb': 'sincos2d'}, 'posemb_prefix=False'),
    ({'posemb': 'rope'}, 'posemb must be one of'),
    ({'mlp_activation': 'relu'}, 'mlp_activation must be one of'),
    ({'num_registers': -1}, 'num_registers'),
])
def test_bad_options_fail_early(overrides, match):
  model = create_model('ViT-smoke_8', 10, **overrides)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 32, 32, 3)))


def test_option_defaults_keep_logits():
  # Options at their defaults are the default model: same params, same function.
  plain = create_model('ViT-smoke_8', 10)
  explicit = create_model('ViT-smoke_8', 10, class_token=True, num_registers=0, posemb='learn',
                          posemb_prefix=True, pre_norm=False, layerscale_init=None,
                          mlp_activation='gelu_tanh', ln_eps=1e-6, fc_norm=False)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = plain.init(jax.random.key(0), x)
  _, a = plain.apply(variables, x)  # the zero-initialised head makes logits uninformative
  _, b = explicit.apply(variables, x)
  assert list(a) == list(b)
  assert jnp.array_equal(a['pre_logits'], b['pre_logits']) and jnp.std(a['pre_logits']) > 0.1
