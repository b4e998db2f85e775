"""How layer names are spelt: the one place that builds and parses them.

Models fill their `out` dict under '/'-joined names (see docs/method.md, "Capture points"):

  ViT / Mixer:  'embedding' | 'stem', 'block03', 'block03/ln0', 'block03/+sa', ..., 'encoder_norm'
  BiT ResNet:   'root/conv', 'root', 'block2/unit01', 'block2/unit01/conv_b', ..., 'head_norm'
  hybrid:       'resnet/root', 'resnet/block1/unit01', ... then the ViT names

A transformer block index is 0-based and written with two digits; a ResNet stage ('block{s}') is
1-based with one digit and its units are 1-based with two digits, as in the BiT checkpoints.
"""
from __future__ import annotations

import dataclasses
import re

_BLOCK = re.compile(r"^block(\d{2,})(?:/(.+))?$")
_UNIT = re.compile(r"^(resnet/)?block(\d)/unit(\d{2,})(?:/(.+))?$")


def block(index: int, point: str = "") -> str:
  """'block03' or 'block03/<point>' for transformer / mixer block `index` (0-based)."""
  if index < 0:
    raise ValueError(f"block index must be >= 0, got {index}")
  name = f"block{index:02d}"
  return f"{name}/{point}" if point else name


def unit(stage: int, unit_index: int, point: str = "") -> str:
  """'block2/unit01' or 'block2/unit01/<point>' for ResNet stage `stage`, unit `unit_index`."""
  if not 1 <= stage <= 9 or unit_index < 1:
    raise ValueError(f"ResNet stages are 1..9 and units 1-based, got stage {stage}, "
                     f"unit {unit_index}")
  name = f"block{stage}/unit{unit_index:02d}"
  return f"{name}/{point}" if point else name


@dataclasses.dataclass(frozen=True)
class LayerName:
  """A parsed layer name.

  Attributes:
    kind: 'block' (transformer / mixer block), 'unit' (ResNet unit) or 'other'.
    block: block index (kind 'block'), else None.
    stage, unit: ResNet stage and unit (kind 'unit'), else None.
    point: what inside the block or unit ('' for its output, e.g. '+sa', 'conv_b').
    name: the name as given.
  """
  kind: str
  name: str
  point: str = ""
  block: int | None = None
  stage: int | None = None
  unit: int | None = None

  @property
  def is_output(self) -> bool:
    """True for the output of a whole block or unit ('block03', 'block2/unit01')."""
    return self.kind != "other" and not self.point

  @property
  def group(self) -> str:
    """Short label of the block or unit ('B3', 'b2u1'), or the name itself."""
    if self.kind == "block":
      return f"B{self.block}"
    if self.kind == "unit":
      return f"b{self.stage}u{self.unit}"
    return self.name


def parse(name: str) -> LayerName:
  """Parses a layer name built by `block` / `unit` (anything else is kind 'other')."""
  m = _UNIT.match(name)
  if m:
    return LayerName("unit", name, m.group(4) or "", stage=int(m.group(2)), unit=int(m.group(3)))
  m = _BLOCK.match(name)
  if m:
    return LayerName("block", name, m.group(2) or "", block=int(m.group(1)))
  return LayerName("other", name)


def block_outputs(names: list[str] | tuple[str, ...]) -> list[str]:
  """The names in `names` that are whole block or unit outputs, in the given order."""
  return [n for n in names if parse(n).is_output]


def literal(name: str) -> str:
  """A glob that matches exactly `name` ('?', '*' and '[' are pattern syntax in globs)."""
  return re.sub(r"([\[\]*?])", r"[\1]", name)


def token_labels(num_tokens: int, has_cls: bool) -> list[str]:
  """The one token-indexing convention of every figure: 'CLS', then 'patch 0', 'patch 1', ...

  Patches are numbered from 0 in row-major order whether or not a CLS token precedes them, so
  the same patch has the same label in a CLS and a GAP model.
  """
  return (["CLS"] if has_cls else []) + [f"patch {i}" for i in range(num_tokens - int(has_cls))]
