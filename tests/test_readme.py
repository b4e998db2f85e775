"""README.md: opens with the two commands, and every Python example in it runs."""
import os
import re

_README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _readme():
  with open(_README, encoding="utf-8") as f:
    return f.read()


def test_readme_opens_with_the_two_commands():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).strip().splitlines()
  assert first_block == [
      'pip install -e ".[dev]" && python -m vit_analysis.main --config=configs/demo.py '
      "--workdir=runs/demo",
      'pip install -e ".[dev]" && pytest -q',
  ]


def test_readme_python_examples_run(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
  assert blocks, "the README shows the public API in Python"
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})


def test_readme_configs_exist():
  repo = os.path.dirname(_README)
  for name in set(re.findall(r"configs/([a-z_0-9]+)\.py", _readme())):
    assert os.path.exists(os.path.join(repo, "configs", f"{name}.py")), name
