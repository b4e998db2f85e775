"""Layer names: building and parsing agree, and the parser rejects what is not a block or unit."""
import pytest

from vit_analysis.models import layers


def test_block_and_unit_round_trip():
  assert layers.block(3) == "block03"
  assert layers.block(12, "+sa") == "block12/+sa"
  assert layers.unit(2, 1) == "block2/unit01"
  assert layers.unit(4, 23, "conv_b") == "block4/unit23/conv_b"
  p = layers.parse(layers.block(11, "mlp_hidden"))
  assert (p.kind, p.block, p.point, p.group, p.is_output) == ("block", 11, "mlp_hidden", "B11",
                                                               False)
  p = layers.parse(layers.unit(3, 6))
  assert (p.kind, p.stage, p.unit, p.point, p.group, p.is_output) == ("unit", 3, 6, "", "b3u6",
                                                                       True)
  p = layers.parse("resnet/block1/unit02/conv_a")  # hybrid backbone
  assert (p.kind, p.stage, p.unit, p.point) == ("unit", 1, 2, "conv_a")


def test_other_names_and_bad_indices():
  for name in ("embedding", "root/conv", "encoder_norm", "block3x", "blocks"):
    assert layers.parse(name).kind == "other"
    assert layers.parse(name).group == name
  assert layers.block_outputs(["embedding", "block00/ln0", "block00", "block1/unit01",
                               "block1/unit01/proj"]) == ["block00", "block1/unit01"]
  with pytest.raises(ValueError, match="block index"):
    layers.block(-1)
  with pytest.raises(ValueError, match="stages"):
    layers.unit(0, 1)


def test_token_labels_number_patches_from_zero_with_or_without_cls():
  assert layers.token_labels(3, has_cls=True) == ["CLS", "patch 0", "patch 1"]
  assert layers.token_labels(2, has_cls=False) == ["patch 0", "patch 1"]
