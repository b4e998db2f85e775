"""timm `VisionTransformer` state dicts (PyTorch layout, saved with safetensors) -> ViT params.

The map, per block i (D width, H heads, d = D / H, torch Linear weights are [out, in]):

  patch_embed.proj.weight [D, 3, P, P] (OIHW) -> embedding/kernel [P, P, 3, D] (HWIO)
  patch_embed.proj.bias [D]                   -> embedding/bias
  cls_token [1, 1, D] / reg_token [1, R, D]   -> cls / reg
  pos_embed [1, T, D]                         -> Transformer/posembed_input/pos_embedding
  norm_pre.{weight,bias}                      -> Transformer/norm_pre/{scale,bias}
  blocks.i.norm1 / norm2                      -> Transformer/encoderblock_i/LayerNorm_0 / _2
  blocks.i.attn.qkv.weight [3D, D]            -> .../MultiHeadDotProductAttention_1/
                                                 {query,key,value}/kernel [D, H, d]
  blocks.i.attn.qkv.bias [3D]                 -> .../{query,key,value}/bias [H, d]
  blocks.i.attn.proj.weight [D, D]            -> .../out/kernel [H, d, D]; bias -> out/bias
  blocks.i.ls1.gamma / ls2.gamma [D]          -> Transformer/encoderblock_i/ls1 / ls2
  blocks.i.mlp.fc1 / fc2                      -> .../MlpBlock_3/Dense_0 / Dense_1
  norm.{weight,bias}                          -> Transformer/encoder_norm/{scale,bias}
  fc_norm.{weight,bias}                       -> fc_norm/{scale,bias}
  head.{weight [C, D], bias}                  -> head/{kernel [D, C], bias}

timm's fused qkv output is laid out as [3, H, d] (it reshapes to (B, N, 3, H, d)), so row
j*D + h*d + k of the weight is projection j, head h, channel k.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from vit_analysis.models import vit

Convert = Callable[[np.ndarray], dict[str, np.ndarray]]


def _ln(timm: str, flax: str, width: int) -> list[tuple[str, tuple[int, ...], Convert]]:
  return [(f'{timm}.weight', (width,), lambda a: {f'{flax}/scale': a}),
          (f'{timm}.bias', (width,), lambda a: {f'{flax}/bias': a})]


def _linear(timm: str, flax: str, n_in: int, n_out: int
            ) -> list[tuple[str, tuple[int, ...], Convert]]:
  return [(f'{timm}.weight', (n_out, n_in), lambda a: {f'{flax}/kernel': a.T}),
          (f'{timm}.bias', (n_out,), lambda a: {f'{flax}/bias': a})]


def layout(model: vit.VisionTransformer, image_size: int
           ) -> list[tuple[str, tuple[int, ...], Convert]]:
  """(timm key, timm shape, converter to flat flax keys) for every tensor `model` needs.

  Args:
    model: the project's ViT (e.g. from `create_model('timm:...')`).
    image_size: input side the position embedding is built for.
  """
  if not isinstance(model, vit.VisionTransformer):
    raise TypeError(f'timm weights load into VisionTransformer, not {type(model).__name__}')
  d, h, p = model.hidden_size, model.num_heads, model.patch_size
  hd = d // h
  grid = (image_size // p)**2
  prefix = int(model.has_class_token) + model.num_registers
  entries: list[tuple[str, tuple[int, ...], Convert]] = [
      ('patch_embed.proj.weight', (d, 3, p, p),
       lambda a: {'embedding/kernel': a.transpose(2, 3, 1, 0)})]
  if model.embedding_bias:
    entries.append(('patch_embed.proj.bias', (d,), lambda a: {'embedding/bias': a}))
  if model.has_class_token:
    entries.append(('cls_token', (1, 1, d), lambda a: {'cls': a}))
  if model.num_registers:
    entries.append(('reg_token', (1, model.num_registers, d), lambda a: {'reg': a}))
  if model.posemb == 'learn':
    tokens = grid + (prefix if model.posemb_prefix else 0)
    entries.append(('pos_embed', (1, tokens, d),
                    lambda a: {'Transformer/posembed_input/pos_embedding': a}))
  if model.pre_norm:
    entries += _ln('norm_pre', 'Transformer/norm_pre', d)
  for i in range(model.num_layers):
    t, f = f'blocks.{i}', f'Transformer/encoderblock_{i}'
    attn = f'{f}/MultiHeadDotProductAttention_1'

    def qkv_weight(a, attn=attn):
      w = a.reshape(3, h, hd, d)  # [j, head, channel, in]
      return {f'{attn}/{n}/kernel': w[j].transpose(2, 0, 1)
              for j, n in enumerate(('query', 'key', 'value'))}

    def qkv_bias(a, attn=attn):
      b = a.reshape(3, h, hd)
      return {f'{attn}/{n}/bias': b[j] for j, n in enumerate(('query', 'key', 'value'))}

    entries += _ln(f'{t}.norm1', f'{f}/LayerNorm_0', d)
    entries += [
        (f'{t}.attn.qkv.weight', (3 * d, d), qkv_weight),
        (f'{t}.attn.qkv.bias', (3 * d,), qkv_bias),
        (f'{t}.attn.proj.weight', (d, d),
         lambda a, attn=attn: {f'{attn}/out/kernel': a.T.reshape(h, hd, d)}),
        (f'{t}.attn.proj.bias', (d,), lambda a, attn=attn: {f'{attn}/out/bias': a})]
    if model.layerscale_init is not None:
      entries.append((f'{t}.ls1.gamma', (d,), lambda a, f=f: {f'{f}/ls1': a}))
    entries += _ln(f'{t}.norm2', f'{f}/LayerNorm_2', d)
    entries += _linear(f'{t}.mlp.fc1', f'{f}/MlpBlock_3/Dense_0', d, model.mlp_dim)
    entries += _linear(f'{t}.mlp.fc2', f'{f}/MlpBlock_3/Dense_1', model.mlp_dim, d)
    if model.layerscale_init is not None:
      entries.append((f'{t}.ls2.gamma', (d,), lambda a, f=f: {f'{f}/ls2': a}))
  if model.classifier == 'map':
    raise ValueError("timm's attention-pool head ('attn_pool.*') is not mapped; load MAP models "
                     'from big_vision npz files')
  entries += _ln('fc_norm', 'fc_norm', d) if model.fc_norm else _ln(
      'norm', 'Transformer/encoder_norm', d)
  width = d
  if model.representation_size is not None:
    entries += _linear('pre_logits.fc', 'pre_logits', d, model.representation_size)
    width = model.representation_size
  if model.num_classes:
    entries += _linear('head', 'head', width, model.num_classes)
  return entries


def hints(state: Mapping[str, np.ndarray], model: vit.VisionTransformer,
          expected: Mapping[str, tuple[int, ...]]) -> list[str]:
  """Likely causes of a mismatch, named by the `VisionTransformer` option that fixes them."""
  out = []
  has = lambda k: k in state
  if has('reg_token') and not model.num_registers:
    out.append(f"the file has {state['reg_token'].shape[1]} register tokens: use "
               f"num_registers={state['reg_token'].shape[1]}, posemb_prefix=False "
               '(timm *_reg4_dinov2)')
  if has('blocks.0.ls1.gamma') and model.layerscale_init is None:
    out.append('the file has LayerScale (ls1/ls2): set layerscale_init (DINOv2: 1e-5)')
  if not has('blocks.0.ls1.gamma') and model.layerscale_init is not None:
    out.append('the file has no LayerScale: set layerscale_init=None')
  if has('norm_pre.weight') != model.pre_norm:
    out.append(f"pre_norm={has('norm_pre.weight')} (CLIP towers have norm_pre)")
  if has('fc_norm.weight') != model.fc_norm:
    out.append(f"fc_norm={has('fc_norm.weight')} (timm: the final norm after GAP)")
  if has('patch_embed.proj.bias') != model.embedding_bias:
    out.append(f"embedding_bias={has('patch_embed.proj.bias')}")
  if has('cls_token') != model.has_class_token:
    out.append(f"class_token={has('cls_token')}")
  if has('head.weight') and not model.num_classes:
    out.append(f"the file has a head of {state['head.weight'].shape[0]} classes: pass "
               f"num_classes={state['head.weight'].shape[0]} or fresh_head=True")
  elif (has('head.weight') and 'head.weight' in expected
        and state['head.weight'].shape != expected['head.weight']):
    out.append(f"the file's head has {state['head.weight'].shape[0]} classes: pass num_classes="
               f"{state['head.weight'].shape[0]} or fresh_head=True")
  elif not has('head.weight') and model.num_classes:
    out.append('the file has no head (self-supervised weights): num_classes=0, or '
               'fresh_head=True for a zero head')
  return out


def to_flax(state: Mapping[str, np.ndarray],
            entries: list[tuple[str, tuple[int, ...], Convert]]) -> dict[str, np.ndarray]:
  """Converts a checked timm state dict to flat '/'-joined flax keys."""
  flat = {}
  for key, _, convert in entries:
    if key in state:
      flat.update(convert(np.asarray(state[key])))
  return flat
