r"""Layer-wise linear probes on the digits models (paper Figs 11, 13, D.4 at CPU scale).

A CLS ViT, a GAP ViT and a ResNet trained on the embedded digits (cached under model_cache).
Every block output / unit output gets 10-shot closed-form ridge probes (3 seeds, l2 = 2^k chosen
on 10 held-out training digits per class, tested on the 1,000 test digits), aggregated as CLS,
mean of patch tokens and mean of all tokens (CLS model), first token and mean (GAP model) and
space-to-depth + average pooling to the final 4x4 grid (ResNet, Appendix A), plus one probe per
token position at every block (ViT) and at each stage's first unit and the last unit (ResNet).

  python -m vit_analysis.main --config=configs/probe_digits.py --workdir=/tmp/probe_digits
  python -m vit_analysis.main --config=configs/probe_digits.py:kind=logistic --workdir=/tmp/pl
  python -m vit_analysis.main --config=configs/probe_digits.py:smoke --workdir=/tmp/probe_smoke
('kind=logistic' / 'kind=ridge': full probes on 3,500 training digits, validated on 500.)
"""
import ml_collections

from vit_analysis import analyses, config_lib


def probe_config(smoke: bool = False, kind: str = "fewshot") -> ml_collections.ConfigDict:
  """The probe sub-config shared by the digits and the ImageNet configs."""
  c = analyses.default_config("probe")  # options and paper defaults
  c.update(dict(kind=kind, num_val=500, batch_size=128))
  c.token_layers = ml_collections.ConfigDict(
      {"ViT": ("block??",), "R": ("block?/unit01", "block4/unit02")})
  if smoke:
    c.update(dict(shots=2, holdout_per_class=1, seeds=2, num_test=64, batch_size=32,
                  l2_exponents=(-4, 8), num_train=256, num_val=64, num_steps=20))
    c.token_layers = ml_collections.ConfigDict({"ViT": ("block01",), "R": ("block4/unit01",)})
  return c


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("kind",))
  config = config_lib.base_config(flags)
  config.models.vit_gap = config_lib.digits_model("vit_gap", "ViT-demo_4-gap", smoke=flags.smoke)
  config.analyses = ("probe",)
  config.probe = probe_config(flags.smoke, flags.get("kind", "fewshot"))
  if config.probe.kind != "fewshot" and not flags.smoke:
    config.probe.num_train = 4000
  return config
