"""Checkpoint files <-> Flax params: npz (vit_jax, BiT, big_vision), safetensors (timm), msgpack.

The npz files are flat dicts with '/'-joined keys. The models in vit_analysis.models use
the files' module names (pre-linen `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`;
BiT's `resnet/block1/unit01/a/...`), so loading is a name-by-name match against the param tree the
model would create (built with `jax.eval_shape`, no weights are initialised). Every missing key,
unexpected key and shape mismatch is reported at once, with hints for the usual causes.

Handled on the way (all visible in `load_npz`'s arguments):
  * an `opt/target/` prefix (old exports) is stripped;
  * big_vision layouts (`params/img/` or `params/` prefixes, scanned `Transformer/encoderblock/`
    arrays, linen-numbered block children, top-level `pos_embedding`) are renamed to vit_jax's
    (vit_analysis.models.checkpoints_big_vision);
  * old GroupNorm scale/bias of shape (1, 1, 1, C) are squeezed to (C,) (vit_jax `_fix_groupnorm`);
  * the position embedding is resized when the token grid differs (vit_jax
    `interpolate_posembed`: CLS kept, square grid, `scipy.ndimage.zoom(order=1)`, corner-aligned);
  * `fresh_head=True` replaces the file's head by a zero head of the model's width;
  * `drop_pre_logits=True` ignores an ImageNet-21k `pre_logits` layer the model does not have.

timm state dicts saved with safetensors load through `load_safetensors` (key map in
vit_analysis.models.checkpoints_timm); Flax msgpack params files through `load_msgpack`. Every path
is opened with `etils.epath`, so `gs://...` works wherever epath has a backend for it.

`load_file` picks the loader by extension; `check_file` raises what it would before a run
(`build.checkpoint_problems`) without reading arrays: npz and safetensors shapes come from their
headers as zero-memory `stand_in`s and go through the loaders' own mapping (`fit_npz`,
`fit_safetensors`) with `shapes_only=True`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import safetensors
import safetensors.numpy
import scipy.ndimage
from etils import epath

from vit_analysis.models import checkpoints_big_vision, checkpoints_timm
from vit_analysis.models import info as model_info

PREFIX = 'opt/target/'
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
_HEAD_PREFIXES = ('head/', 'resnet/head/')
_NORM_LEAF = re.compile(r'(.*/)?(group_norm|gn_?\w*|\w*[Nn]orm\w*)/(gamma|beta|scale|bias)$')

PathLike = str | os.PathLike
NpzSource = PathLike | Mapping[str, Any]


def _kind(head: bytes) -> str:
  """What a file that is not an npz most likely is, from its first bytes."""
  if not head:
    return 'it is empty'
  if head.startswith(b'\x93NUMPY'):
    return 'it is a single .npy array (numpy.save), not an archive of named arrays'
  if len(head) >= 9 and head[8:9] == b'{' and struct.unpack('<Q', head[:8])[0] < 1 << 30:
    return 'it is a safetensors file: use checkpoints.load_safetensors'
  if head[:1] == b'\x80':
    return ('it looks like a pickle (a legacy PyTorch .pth) or a Flax msgpack file: save timm '
            'weights with safetensors and use checkpoints.load_safetensors, or use '
            'checkpoints.load_msgpack')
  if head[:1] in (b'{', b'['):
    return 'it is text (JSON?)'
  return f'it starts with {head[:8]!r}'


def _not_npz(path: Any, why: str) -> ValueError:
  return ValueError(
      f'{path} is not an .npz checkpoint: expected a zip archive of .npy arrays with '
      f"'/'-joined parameter names (numpy.savez; the vit_jax, BiT and big_vision releases); "
      f'{why}')


@contextlib.contextmanager
def _open_zip(path: PathLike) -> Iterator[Any]:
  """The checkpoint file opened for reading, at offset 0, once its first bytes say it is a zip.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a zip (the message says what it seems to be: `_kind`).
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  with p.open('rb') as f:
    head = f.read(16)
    if not head.startswith(b'PK'):
      raise _not_npz(path, _kind(head))
    f.seek(0)
    yield f


def read_npz(source: NpzSource) -> dict[str, np.ndarray]:
  """Reads an npz file (or takes a mapping) into {key: array}, stripping 'opt/target/'.

  Args:
    source: path of an `.npz` file (anything `etils.epath` opens, e.g. gs://), or a mapping of
      '/'-joined keys to arrays.

  Returns:
    {key: np.ndarray} with the prefix removed from every key that has it.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not an npz archive (the message says what it seems to be).
  """
  if isinstance(source, Mapping):
    flat = {k: np.asarray(v) for k, v in source.items()}
  else:
    with _open_zip(source) as f:
      try:
        with np.load(f, allow_pickle=False) as z:
          torch_zip = any(n.endswith('.pkl') for n in z.zip.namelist())
          flat = {} if torch_zip else {k: z[k] for k in z.files}
      except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise _not_npz(source, f'a zip that numpy cannot read as arrays ({e})') from None
    if torch_zip:
      raise _not_npz(source, 'it is a PyTorch zip checkpoint (torch.save): save the state dict '
                     'with safetensors and use checkpoints.load_safetensors')
    odd = sorted(k for k, v in flat.items() if not isinstance(v, np.ndarray))
    if odd:
      raise _not_npz(source, f'members that are not .npy arrays: {odd[:5]}')
  out = {}
  for k, v in flat.items():
    key = k.removeprefix(PREFIX)
    if key in out:
      raise ValueError(f'checkpoint has {key!r} both with and without the {PREFIX!r} prefix')
    out[key] = v
  return out


def resize_posemb(posemb: np.ndarray, num_tokens: int, num_prefix_tokens: int) -> np.ndarray:
  """vit_jax's `interpolate_posembed`: bilinear, corner-aligned resize of a square grid.

  Output cell i reads input coordinate i * (g_old - 1) / (g_new - 1) (scipy `zoom`, order 1,
  grid_mode=False); prefix (CLS) entries are kept unchanged.

  Args:
    posemb: [1, T_old, D], the first `num_prefix_tokens` entries not on the grid.
    num_tokens: T_new, including the prefix tokens.
    num_prefix_tokens: 1 for a CLS model, 0 for GAP.

  Returns:
    [1, T_new, D] in posemb's dtype.

  Raises:
    ValueError: when either grid is not square or shapes are not [1, T, D].
  """
  posemb = np.asarray(posemb)
  g_old, g_new = _posemb_grids(posemb.shape, num_tokens, num_prefix_tokens)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  grid = grid.reshape(g_old, g_old, -1).astype(np.float64)
  zoom = (g_new / g_old, g_new / g_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(1, g_new * g_new, -1)
  return np.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)


def _posemb_grids(shape: tuple[int, ...], num_tokens: int,
                  num_prefix_tokens: int) -> tuple[int, int]:
  """(old, new) side of the square grids of a [1, T, D] position embedding resized to T_new.

  Raises:
    ValueError: when either grid is not square or the shape is not [1, T, D].
  """
  if len(shape) != 3 or shape[0] != 1:
    raise ValueError(f'position embedding must be [1, T, D], got shape {tuple(shape)}')
  old, new = shape[1] - num_prefix_tokens, num_tokens - num_prefix_tokens
  g_old, g_new = math.isqrt(max(old, 0)), math.isqrt(max(new, 0))
  if g_old**2 != old or g_new**2 != new:
    raise ValueError(
        f'position embeddings resize only square grids: {old} -> {new} grid tokens (after '
        f'{num_prefix_tokens} prefix tokens)')
  return g_old, g_new


def _resized_posemb(posemb: np.ndarray, num_tokens: int, num_prefix_tokens: int,
                    shapes_only: bool) -> np.ndarray:
  """`resize_posemb`, or with `shapes_only` its checks and a stand-in of the new shape."""
  if not shapes_only:
    return resize_posemb(posemb, num_tokens, num_prefix_tokens)
  _posemb_grids(posemb.shape, num_tokens, num_prefix_tokens)
  return stand_in((1, num_tokens, posemb.shape[2]), posemb.dtype)


def stand_in(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """A read-only array of `shape` and `dtype` that takes no memory (one zero, broadcast).

  The fit checks run on these in place of a checkpoint's arrays, so that checking a multi-GB
  file before a run reads only its headers.
  """
  return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def param_shapes(model: nn.Module,
                 image_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """{flat '/'-joined key: ShapeDtypeStruct} of `model`'s params at `image_size` (no init)."""
  size = image_size or getattr(model, 'image_size', None)
  if not size:
    raise ValueError(f'{type(model).__name__} has no image_size attribute: pass image_size=')
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, size, size, 3)))
  return flax.traverse_util.flatten_dict(variables['params'], sep='/')


def load_npz(source: NpzSource, model: nn.Module, *, image_size: int | None = None,
             fresh_head: bool = False, drop_pre_logits: bool = False,
             resize_posemb_ok: bool = True) -> dict[str, Any]:
  """Loads an official checkpoint into `model`'s param tree.

  Args:
    source: `.npz` path or a mapping of '/'-joined keys to arrays.
    model: an unbound vit_analysis model (from `create_model`).
    image_size: input size the params are built for (default: `model.image_size`). A ViT
      position embedding of another grid size is resized to it.
    fresh_head: ignore the file's head and use a zero head of the model's `num_classes`
      (fine-tuning, or a model created with num_classes=0/None).
    drop_pre_logits: ignore a `pre_logits` (Dense + tanh) layer the model does not have. This
      changes the network's function: only sensible with `fresh_head=True`.
    resize_posemb_ok: allow the position-embedding resize; otherwise a grid change is an error.

  Returns:
    {'params': nested dict of jax arrays} for `model.apply`.

  Raises:
    ValueError: listing every missing key, unexpected key, shape mismatch and non-finite array,
      with hints (classifier, pre_logits, head width, resolution).
  """
  flat, expected = fit_npz(read_npz(source), model, image_size=image_size,
                           fresh_head=fresh_head, drop_pre_logits=drop_pre_logits,
                           resize_posemb_ok=resize_posemb_ok)
  params = {k: jnp.asarray(flat[k], dtype=e.dtype) for k, e in expected.items()}
  return {'params': flax.traverse_util.unflatten_dict(params, sep='/')}


def fit_npz(flat: dict[str, np.ndarray], model: nn.Module, *, image_size: int | None = None,
            fresh_head: bool = False, drop_pre_logits: bool = False,
            resize_posemb_ok: bool = True, shapes_only: bool = False
            ) -> tuple[dict[str, np.ndarray], dict[str, jax.ShapeDtypeStruct]]:
  """`load_npz`'s mapping and checks on read arrays: {key: array} in the model's names.

  Args:
    flat: {'/'-joined key: array} as `read_npz` (or `read_npz_shapes`) returns it.
    model, image_size, fresh_head, drop_pre_logits, resize_posemb_ok: as for `load_npz`.
    shapes_only: `flat` holds `stand_in`s (`read_npz_shapes`): values are neither computed
      (a resized position embedding is a stand-in too) nor checked for being finite.

  Returns:
    (flat params, renamed and fixed, keyed like the model; the model's {key: ShapeDtypeStruct}).

  Raises:
    ValueError: listing every missing key, unexpected key, shape mismatch and non-finite array.
  """
  if checkpoints_big_vision.is_big_vision(flat):
    flat = checkpoints_big_vision.to_vit_jax(flat)
  else:
    flat = dict(flat)
  expected = param_shapes(model, image_size)
  hints = []

  # Old (1, 1, 1, C) GroupNorm scale/bias (vit_jax `_fix_groupnorm`).
  for k, v in flat.items():
    e = expected.get(k)
    if (e is not None and len(e.shape) == 1 and v.shape != e.shape and _NORM_LEAF.match(k)
        and v.shape == (1,) * (v.ndim - 1) + e.shape):
      flat[k] = v.reshape(e.shape)

  file_cls, model_cls = 'cls' in flat, 'cls' in expected
  if file_cls != model_cls and (POSEMB_KEY in flat or POSEMB_KEY in expected):
    hints.append(
        "the file is a CLS-token model ('cls' present) but the model has classifier='gap'"
        if file_cls else
        "the file has no 'cls': it is a GAP model (vit_jax '-gap-norep'); create the model with "
        "classifier='gap' (e.g. 'ViT-B_32-gap')")
  elif POSEMB_KEY in flat and POSEMB_KEY in expected:
    old, new = flat[POSEMB_KEY].shape, expected[POSEMB_KEY].shape
    if old != new and len(old) == len(new) == 3 and old[2] == new[2]:
      if resize_posemb_ok:
        flat[POSEMB_KEY] = _resized_posemb(flat[POSEMB_KEY], new[1], _posemb_prefix(model),
                                           shapes_only)
      else:
        hints.append(f'position embedding has {old[1]} tokens in the file and {new[1]} in the '
                     'model (another image size): pass resize_posemb_ok=True or set image_size')

  file_rep = sorted(k for k in flat if k.startswith('pre_logits/'))
  if file_rep and not any(k.startswith('pre_logits/') for k in expected):
    if drop_pre_logits:
      for k in file_rep:
        del flat[k]
    else:
      hints.append(
          f"the file has a pre_logits layer (ImageNet-21k upstream) of size "
          f"{flat[file_rep[0]].shape[-1]}: create the model with representation_size="
          f"{flat[file_rep[0]].shape[-1]}, or pass drop_pre_logits=True (with fresh_head=True)")
  elif not file_rep and any(k.startswith('pre_logits/') for k in expected):
    hints.append('the model has a pre_logits layer but the file has none (AugReg / fine-tuned '
                 'files): create the model with representation_size=None')

  if fresh_head:
    for k in [k for k in flat if k.startswith(_HEAD_PREFIXES)]:
      del flat[k]
    for k, e in expected.items():
      if k.startswith(_HEAD_PREFIXES):
        flat[k] = stand_in(e.shape, e.dtype)  # a zero head: jnp.asarray copies it
  else:
    head = [k for k in flat if k.startswith(_HEAD_PREFIXES) and k.endswith('bias')]
    for k in head:
      if k in expected and flat[k].shape != expected[k].shape:
        hints.append(f'{k}: the file has {flat[k].shape[-1]} classes and the model '
                     f'{expected[k].shape[-1]}: create the model with num_classes='
                     f'{flat[k].shape[-1]} or pass fresh_head=True')
    if head and not any(k.startswith(_HEAD_PREFIXES) for k in expected):
      hints.append('the model has no head (num_classes=0/None): pass fresh_head=True to drop '
                   "the file's head")

  mismatched = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape)
  if any('/token_mixing/' in k for k in mismatched):
    hints.append('Mixer token-mixing shapes differ: the token count (image size / patch) is '
                 'fixed by the checkpoint; use its image size')
  _check_fit(model, flat, {k: tuple(e.shape) for k, e in expected.items()}, hints,
             check_values=not shapes_only)
  return flat, expected


def _posemb_prefix(model: nn.Module) -> int:
  """How many prefix tokens (CLS, registers) the model's position embedding has entries for."""
  if not getattr(model, 'posemb_prefix', True):
    return 0
  return model_info.describe(model, getattr(model, 'image_size', None) or None).num_prefix_tokens


def _check_fit(model: nn.Module, flat: Mapping[str, np.ndarray],
               expected: Mapping[str, tuple[int, ...]], hints: list[str],
               check_values: bool = True) -> None:
  """Raises one ValueError naming every missing, unexpected, mis-shaped and non-finite array.

  With `check_values=False` (stand-ins) only dtypes are checked: `np.isfinite` of a broadcast
  stand-in would allocate its full size.
  """
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  common = set(flat) & set(expected)
  mismatched = sorted(k for k in common if tuple(flat[k].shape) != tuple(expected[k]))
  bad_values = sorted(k for k in common - set(mismatched)
                      if flat[k].dtype.kind not in 'fiu'
                      or check_values and not np.all(np.isfinite(flat[k])))
  if missing or unexpected or mismatched or bad_values or hints:
    lines = [(f'checkpoint does not fit {type(model).__name__} '
              f'({len(expected)} model params, {len(flat)} file arrays):')]
    lines += [f'  hint: {h}' for h in hints]
    lines += [f'  missing in file ({len(missing)}): {k}' for k in missing]
    lines += [f'  unexpected in file ({len(unexpected)}): {k}' for k in unexpected]
    lines += [f'  shape mismatch ({len(mismatched)}): {k}: file {tuple(flat[k].shape)} vs '
              f'model {tuple(expected[k])}' for k in mismatched]
    lines += [f'  non-numeric or non-finite values: {k} ({flat[k].dtype})' for k in bad_values]
    raise ValueError('\n'.join(lines))


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """{tensor name: np.ndarray} of a safetensors file (any `etils.epath` path)."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  data = p.read_bytes()
  try:
    return dict(safetensors.numpy.load(data))
  except (safetensors.SafetensorError, ValueError, TypeError) as e:
    raise ValueError(f'{path} is not a safetensors file readable with NumPy ({e}); '
                     f'{_kind(data[:16])}') from None


def load_safetensors(path: PathLike, model: nn.Module, *, image_size: int | None = None,
                     fresh_head: bool = False, resize_posemb_ok: bool = True) -> dict[str, Any]:
  """Loads a timm `VisionTransformer` state dict (safetensors) into the project's ViT.

  Args:
    path: `.safetensors` file (e.g. `model.safetensors` of a timm model on the Hugging Face hub).
    model: a `VisionTransformer` with the architecture's options (`create_model('timm:...')`).
    image_size: input size the params are built for (default: `model.image_size`); a position
      embedding of another grid is resized (bilinear, corner-aligned, as vit_jax; timm itself
      resamples bicubically, so a resized grid differs from timm's by the interpolation).
    fresh_head: ignore the file's head and use a zero head of the model's width.
    resize_posemb_ok: allow the position-embedding resize.

  Returns:
    {'params': nested dict} for `model.apply`.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor by its timm name, with
      the option that fixes the usual causes.
  """
  size = image_size or model.image_size
  state, entries = fit_safetensors(read_safetensors(path), model, image_size=size,
                                   fresh_head=fresh_head, resize_posemb_ok=resize_posemb_ok)
  flat = checkpoints_timm.to_flax(state, entries)
  shapes = param_shapes(model, size)
  if set(flat) != set(shapes):  # The key map and the model disagree: a bug here, not the file.
    raise AssertionError(f'timm key map out of date: {sorted(set(flat) ^ set(shapes))[:6]}')
  params = {k: jnp.asarray(flat[k], dtype=e.dtype) for k, e in shapes.items()}
  return {'params': flax.traverse_util.unflatten_dict(params, sep='/')}


def fit_safetensors(state: dict[str, np.ndarray], model: nn.Module, *, image_size: int,
                    fresh_head: bool = False, resize_posemb_ok: bool = True,
                    shapes_only: bool = False) -> tuple[dict[str, np.ndarray], list[Any]]:
  """`load_safetensors`' checks on a read state dict (or its `stand_in`s, with `shapes_only`).

  Returns:
    (the state dict with head and position embedding fixed, `checkpoints_timm.layout` entries).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor by its timm name.
  """
  entries = checkpoints_timm.layout(model, image_size)
  expected = {k: shape for k, shape, _ in entries}
  state = dict(state)  # the caller's dict stays as read
  if fresh_head:
    state = {k: v for k, v in state.items() if not k.startswith('head.')}
    state.update({k: stand_in(shape, np.float32) for k, shape in expected.items()
                  if k.startswith('head.')})
  hints = checkpoints_timm.hints(state, model, expected)
  pos = state.get('pos_embed')
  if pos is not None and 'pos_embed' in expected and pos.shape != expected['pos_embed']:
    new = expected['pos_embed']
    if pos.ndim == 3 and pos.shape[2] == new[2] and resize_posemb_ok:
      try:
        state['pos_embed'] = _resized_posemb(pos, new[1], _posemb_prefix(model), shapes_only)
      except ValueError as e:  # Usually a prefix-token mismatch, reported with the keys below.
        hints.append(f'pos_embed {tuple(pos.shape)} cannot be resized to {new}: {e}')
    elif pos.ndim == 3 and pos.shape[2] == new[2]:
      hints.append(f'pos_embed has {pos.shape[1]} tokens in the file and {new[1]} in the model '
                   '(another image size): pass resize_posemb_ok=True or set image_size')
  _check_fit(model, state, expected, hints, check_values=not shapes_only)
  return state, entries


def read_msgpack(path: PathLike) -> dict[str, np.ndarray]:
  """Flat {'/'-joined key: array} of a Flax msgpack file (`flax.serialization.to_bytes`).

  A top-level {'params': ...} (a variables dict or a train state's params) is unwrapped.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  data = p.read_bytes()
  try:
    tree = flax.serialization.msgpack_restore(data)
  except (msgpack.UnpackException, ValueError, TypeError) as e:
    raise ValueError(f'{path} is not a Flax msgpack file ({type(e).__name__}: {e}); '
                     f'{_kind(data[:16])}') from None
  if not isinstance(tree, dict):
    raise TypeError(f'{path} holds a {type(tree).__name__}, not a dict of parameters')
  if set(tree) == {'params'} or ('params' in tree and 'step' in tree):
    tree = tree['params']
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def load_msgpack(path: PathLike, model: nn.Module, **kwargs: Any) -> dict[str, Any]:
  """`load_npz` for a Flax msgpack params file; takes the same keyword arguments."""
  return load_npz(read_msgpack(path), model, **kwargs)


def read_npz_shapes(path: PathLike) -> dict[str, np.ndarray]:
  """`read_npz` from the members' `.npy` headers alone: {key: `stand_in` of its shape, dtype}.

  Each member is checked to hold as many bytes as its header says. The compressed data is never
  read, so a corruption inside it (a CRC error) shows only when `read_npz` reads the file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: as `read_npz`, for a file that is not an npz of arrays or a truncated member.
  """
  flat = {}
  with _open_zip(path) as f:
    try:
      with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        if any(i.filename.endswith('.pkl') for i in infos):
          raise _not_npz(path, 'it is a PyTorch zip checkpoint (torch.save): save the state '
                         'dict with safetensors and use checkpoints.load_safetensors')
        odd = sorted(i.filename for i in infos if not i.filename.endswith('.npy'))
        if odd:
          raise _not_npz(path, f'members that are not .npy arrays: {odd[:5]}')
        for info in infos:
          with z.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
            size = member.tell() + math.prod(shape) * dtype.itemsize
          if dtype.hasobject:  # what np.load(allow_pickle=False) refuses
            raise ValueError(f'{info.filename} holds Python objects')
          if info.file_size != size:
            raise ValueError(f'{info.filename} holds {info.file_size} bytes, its header '
                             f'({dtype} {shape}) {size}: the file is truncated or corrupt')
          flat[info.filename[:-len('.npy')]] = stand_in(shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      if str(e).startswith(f'{path} is not an .npz'):
        raise
      raise _not_npz(path, f'a zip that numpy cannot read as arrays ({e})') from None
  return read_npz(flat)  # the prefix, as for the arrays


# safetensors' dtype names that `safetensors.numpy` reads (BF16 and FP8 it cannot).
_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
                       'U64': np.uint64, 'I32': np.int32, 'U32': np.uint32, 'I16': np.int16,
                       'U16': np.uint16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
                       'C64': np.complex64}


def read_safetensors_shapes(path: PathLike) -> dict[str, np.ndarray]:
  """`read_safetensors` from the file's JSON header alone: {name: `stand_in`}.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a header that does not parse, a dtype NumPy cannot hold, or tensor data that
      does not lie inside the file (truncated).
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  with p.open('rb') as f:
    head = f.read(8)
    f.seek(0, os.SEEK_END)
    data_size = f.tell() - 8
    n = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
    try:
      if not 0 < n <= min(data_size, 100 << 20):  # safetensors caps the header at 100 MB
        raise ValueError('no header')
      f.seek(8)
      header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise ValueError('no header')
    except (ValueError, UnicodeDecodeError):
      f.seek(0)
      raise ValueError(f'{path} is not a safetensors file readable with NumPy (no JSON header); '
                       f'{_kind(f.read(16))}') from None
  state = {}
  for name, t in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(t.get('dtype'))
    if dtype is None:
      raise ValueError(f'{path}: tensor {name!r} has dtype {t.get("dtype")!r}, which '
                       'safetensors.numpy cannot read (save it as F32/F16)')
    shape, (begin, end) = tuple(t['shape']), t['data_offsets']
    if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or end > data_size - n:
      raise ValueError(f'{path} is not a safetensors file readable with NumPy: tensor {name!r} '
                       f'({t["dtype"]} {list(shape)}) at bytes {begin}..{end} of '
                       f'{data_size - n} (truncated or corrupt)')
    state[name] = stand_in(shape, dtype)
  return state


def _format(path: PathLike) -> str:
  """'safetensors', 'msgpack' or 'npz': by the extension, as `load_file` reads it."""
  path = os.fspath(path)
  return next((kind for kind in ('safetensors', 'msgpack') if path.endswith(f'.{kind}')), 'npz')


def load_file(path: PathLike, model: nn.Module, *, image_size: int | None = None,
              **options: Any) -> dict[str, Any]:
  """`load_safetensors`, `load_msgpack` or `load_npz`, by the file's extension.

  Args:
    path: the checkpoint.
    model: the model it is for.
    image_size: input size the params are built for.
    **options: the loader's keyword arguments (`config.models.<key>.checkpoint_options`).
  """
  loader = {'safetensors': load_safetensors, 'msgpack': load_msgpack,
            'npz': load_npz}[_format(path)]
  return loader(path, model, image_size=image_size, **options)


def check_file(path: PathLike, model: nn.Module, *, image_size: int | None = None,
               **options: Any) -> None:
  """Raises what `load_file(path, model, ...)` would, reading no array data if it can.

  npz and safetensors files are read from their headers (`read_npz_shapes`,
  `read_safetensors_shapes`) and go through the loaders' own mapping and checks on `stand_in`s,
  so a multi-GB checkpoint is checked in milliseconds and is read once, by the loader. A msgpack
  file has no header (its array sizes are inside the one serialised tree), so it is read whole
  here and again by `load_msgpack`, one after the other.

  Raises:
    FileNotFoundError, ValueError, TypeError: as the loader would.
  """
  kind = _format(path)
  if kind == 'safetensors':
    fit_safetensors(read_safetensors_shapes(path), model,
                    image_size=image_size or model.image_size, shapes_only=True, **options)
  elif kind == 'msgpack':
    fit_npz(read_msgpack(path), model, image_size=image_size, **options)
  else:
    fit_npz(read_npz_shapes(path), model, image_size=image_size, shapes_only=True, **options)


def save_npz(params: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes params as a flat '/'-keyed npz (the official layout), atomically.

  Args:
    params: a nested param dict, or variables {'params': ...}.
    path: destination; written to a temporary file in the same folder, then renamed, so an error
      never leaves a half-written file behind.
  """
  if set(params) == {'params'}:
    params = params['params']
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
  for k, v in arrays.items():
    if v.dtype.kind not in 'fiu':
      raise ValueError(f'param {k!r} has non-numeric dtype {v.dtype}')
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


_VIT_SIZES = {(192, 12): 'Ti', (384, 12): 'S', (768, 12): 'B', (1024, 24): 'L', (1280, 32): 'H'}
_MIXER_SIZES = {(512, 8): 'S', (768, 12): 'B', (1024, 24): 'L', (1280, 32): 'H'}
_HYBRID_DEPTHS = {(3, 4, 9): 'R50', (2, 2, 2, 2): 'R26', (3, 4, 6, 3): 'R50'}
_BIT_DEPTHS = {(2, 2, 2, 2): 'R26', (3, 4, 6, 3): 'R50', (3, 4, 23, 3): 'R101',
               (3, 8, 36, 3): 'R152'}


def inspect_npz(source: NpzSource) -> dict[str, Any]:
  """Describes an official checkpoint from its keys and shapes.

  Returns:
    {'name': registry name (vit_jax spelling, e.g. 'ViT-B_16', 'ViT-B_32-gap', 'R50+ViT-B_16',
     'R50x1', 'Mixer-B_16'), 'num_classes': head width or None, 'representation_size':
     pre_logits width or None, 'image_size': the resolution the file was trained at (None for
     BiT: any)}.
    Pass them to `create_model(name, num_classes, representation_size=...)` (ViT only).
    A big_vision file gives 'big_vision:<size>/<patch>' and also 'pool_type' and 'posemb'
    (image_size None for sincos2d), for `create_model(name, num_classes, pool_type=...,
    posemb=..., rep_size=representation_size or False)`.

  Raises:
    ValueError: a layout that is none of the three families, or a size the registry lacks.
  """
  flat = read_npz(source)
  big_vision = checkpoints_big_vision.is_big_vision(flat)
  if big_vision:
    flat = checkpoints_big_vision.to_vit_jax(flat)
  head = flat.get('head/kernel', flat.get('resnet/head/conv2d/kernel'))
  info = {'num_classes': None if head is None else int(head.shape[-1]),
          'representation_size': None, 'image_size': None}
  if big_vision:
    return {**info, **checkpoints_big_vision.describe_flat(flat)}
  if 'embedding/kernel' in flat and POSEMB_KEY in flat:
    p, d = flat['embedding/kernel'].shape[0], flat['embedding/kernel'].shape[-1]
    depth = len({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')})
    size = _VIT_SIZES.get((d, depth))
    if size is None:
      raise ValueError(f'no registered ViT has width {d} and {depth} blocks')
    prefix = ''
    if 'conv_root/kernel' in flat:  # hybrid: the patch is counted in input pixels
      units = tuple(len({k.split('/')[1] for k in flat if k.startswith(f'block{s}/')})
                    for s in range(1, 5))
      units = tuple(u for u in units if u)
      if units not in _HYBRID_DEPTHS:
        raise ValueError(f'no registered hybrid has backbone units {units}')
      prefix = _HYBRID_DEPTHS[units] + '+'
      p *= 4 * 2**(len(units) - 1)
    grid = flat[POSEMB_KEY].shape[1] - int('cls' in flat)
    info.update(name=f'{prefix}ViT-{size}_{p}' + ('' if 'cls' in flat else '-gap'),
                image_size=math.isqrt(grid) * p)
    if 'pre_logits/kernel' in flat:
      info['representation_size'] = int(flat['pre_logits/kernel'].shape[-1])
  elif 'stem/kernel' in flat:
    p, d = flat['stem/kernel'].shape[0], flat['stem/kernel'].shape[-1]
    depth = len({k.split('/')[0] for k in flat if k.startswith('MixerBlock_')})
    size = _MIXER_SIZES.get((d, depth))
    if size is None:
      raise ValueError(f'no registered Mixer has width {d} and {depth} blocks')
    tokens = flat['MixerBlock_0/token_mixing/Dense_0/kernel'].shape[0]
    info.update(name=f'Mixer-{size}_{p}', image_size=math.isqrt(tokens) * p)
  elif 'resnet/root_block/standardized_conv2d/kernel' in flat:
    width = flat['resnet/root_block/standardized_conv2d/kernel'].shape[-1]
    units = tuple(len({k.split('/')[2] for k in flat if k.startswith(f'resnet/block{s}/')})
                  for s in range(1, 5))
    if units not in _BIT_DEPTHS or width % 64:
      raise ValueError(f'no registered BiT ResNet has units {units} and root width {width}')
    info.update(name=f'{_BIT_DEPTHS[units]}x{width // 64}')
  else:
    raise ValueError(f'unknown checkpoint layout; first keys: {sorted(flat)[:8]}')
  return info
