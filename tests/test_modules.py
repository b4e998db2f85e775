"""docs/modules.md is the map of the package: every module it names exists, every module is in it,
and every import in the package points down the flow (to a lower rank or within its own folder)."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vit_analysis")


def _map() -> dict[str, int]:
  """'vit_analysis.<folder>.<module>' -> rank, from the table in docs/modules.md."""
  ranks = {}
  with open(os.path.join(ROOT, "docs", "modules.md")) as f:
    for line in f:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if len(cells) != 4 or not re.fullmatch(r"\d+", cells[0]):
        continue
      folder = cells[1].strip("`").rstrip("/")
      prefix = "vit_analysis" if folder == "vit_analysis" else f"vit_analysis.{folder}"
      for name in re.findall(r"`([a-z_]+)\.py`", cells[2]):
        ranks[f"{prefix}.{name}"] = int(cells[0])
  return ranks


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  found = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[rel] = path
  return found


def _rank(module: str, ranks: dict[str, int]) -> int:
  if module in ranks:
    return ranks[module]
  if f"{module}.__init__" in ranks:
    return ranks[f"{module}.__init__"]
  # `from vit_analysis.models import create_model`: a package's names live in its __init__.
  raise KeyError(module)


def _imports(path: str, module: str) -> list[str]:
  """Package modules imported by the file, including `from pkg import submodule`."""
  tree = ast.parse(open(path).read())
  is_package = path.endswith("__init__.py")
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.startswith("vit_analysis.")]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if not base.startswith("vit_analysis"):
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") or
                   os.path.isdir(os.path.join(ROOT, *sub.split("."))) else base)
  return out


def test_map_and_tree_list_the_same_modules():
  ranks = _map()
  modules = {m for m in _modules() if m != "vit_analysis.__init__"}
  assert sorted(modules - set(ranks)) == [], "modules missing from docs/modules.md"
  assert sorted(set(ranks) - modules) == [], "docs/modules.md names modules that do not exist"


def test_imports_point_down_the_flow():
  ranks = _map()
  upward = []
  for module, path in _modules().items():
    if module == "vit_analysis.__init__":
      continue
    folder = module.rsplit(".", 1)[0]
    for imported in _imports(path, module):
      same_folder = folder != "vit_analysis" and folder in (imported, imported.rsplit(".", 1)[0])
      if imported == "vit_analysis" or same_folder:
        continue
      if _rank(imported, ranks) >= ranks[module]:
        upward.append(f"{module} (rank {ranks[module]}) imports {imported} "
                      f"(rank {_rank(imported, ranks)})")
  assert upward == []


def test_the_report_and_config_helpers_import_no_jax(tmp_path):
  import subprocess
  import sys
  code = ("import sys, vit_analysis.report, vit_analysis.config_lib, vit_analysis.models.layers; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib')); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                 env=dict(os.environ, PYTHONPATH=ROOT))
