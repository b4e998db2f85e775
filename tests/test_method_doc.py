"""docs/method.md: every `docs/method.md#<anchor>` in the repo names a heading that exists.

Anchors follow GitHub's rules for Markdown headings: lower-case, punctuation other than '-' and '_'
removed, each space replaced by '-', and a repeated heading gets '-1', '-2', ... appended.
"""
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# Folders that hold no project sources (virtual environments, build output, run outputs).
_SKIP_DIRS = {".git", "__pycache__", "build", "dist", "runs", "node_modules", ".venv", "venv",
              ".pytest_cache", ".ruff_cache"}
_SCANNED = (".py", ".md", ".ipynb")
_LINK = re.compile(r"docs/method\.md#([\w-]+)")  # GitHub anchors hold only \w and '-'


def github_slug(heading: str, seen: dict[str, int]) -> str:
  """The anchor GitHub gives a heading; `seen` counts earlier slugs for the '-N' suffixes."""
  text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
  text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (Unicode too)
  slug = text.replace(" ", "-")
  count = seen.get(slug, 0)
  seen[slug] = count + 1
  return slug if count == 0 else f"{slug}-{count}"


def headings(markdown: str) -> list[tuple[int, str]]:
  """(level, text) of every ATX heading outside fenced code blocks."""
  out, fenced = [], False
  for line in markdown.splitlines():
    if line.lstrip().startswith(("```", "~~~")):
      fenced = not fenced
      continue
    m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
    if m and not fenced:
      out.append((len(m[1]), m[2]))
  return out


def anchors(markdown: str) -> list[str]:
  seen: dict[str, int] = {}
  return [github_slug(text, seen) for _, text in headings(markdown)]


def repo_links(root: pathlib.Path = ROOT) -> list[tuple[str, int, str]]:
  """(file relative to `root`, line number, anchor) of every `docs/method.md#...` link."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
    for name in sorted(files):
      if not name.endswith(_SCANNED):
        continue
      path = pathlib.Path(folder) / name
      try:
        text = path.read_text(encoding="utf-8")
      except (UnicodeDecodeError, OSError):
        continue
      for number, line in enumerate(text.splitlines(), 1):
        for m in _LINK.finditer(line):
          found.append((str(path.relative_to(root)), number, m[1]))
  return found


@pytest.mark.parametrize("heading,slug", [
    ("Minibatch CKA", "minibatch-cka"),
    ("Dataset scale and fine-tuning", "dataset-scale-and-fine-tuning"),
    ("Error bars: jackknife over minibatches, spread over repeats",
     "error-bars-jackknife-over-minibatches-spread-over-repeats"),
    ("The `fine` preset (ViT/ResNet)", "the-fine-preset-vitresnet"),
    ("Skip norms", "skip-norms"),
])
def test_github_slug(heading, slug):
  assert github_slug(heading, {}) == slug


def test_repeated_headings_get_suffixes():
  assert anchors("# A\n## A\n### A\n") == ["a", "a-1", "a-2"]
  assert anchors("# A\n```\n# not a heading\n```\n## B\n") == ["a", "b"]


def test_method_doc_exists_with_unique_section_anchors():
  text = METHOD.read_text(encoding="utf-8")
  sections = [github_slug(t, {}) for level, t in headings(text) if level == 2]
  assert len(sections) == len(set(sections)), "two ## sections would share an anchor"
  for required in ("minibatch-cka", "attention-distance", "linear-probes", "known-deviations"):
    assert required in sections


def test_top_table_lists_every_section():
  text = METHOD.read_text(encoding="utf-8")
  listed = set(re.findall(r"\[`#([\w-]+)`\]\(#\1\)", text))
  sections = {github_slug(t, {}) for level, t in headings(text) if level == 2}
  assert sections - listed == set(), "sections missing from the anchor table at the top"
  assert listed - set(anchors(text)) == set(), "the anchor table names missing headings"


def test_links_inside_method_doc_resolve():
  text = METHOD.read_text(encoding="utf-8")
  known = set(anchors(text))
  dangling = sorted(set(re.findall(r"\]\(#([^)]*)\)", text)) - known)
  assert not dangling, f"docs/method.md links to missing anchors {dangling}"


def test_every_repo_link_to_method_doc_resolves():
  known = set(anchors(METHOD.read_text(encoding="utf-8")))
  dangling = [f"{f}:{n}: #{a}" for f, n, a in repo_links() if a not in known]
  assert not dangling, ("links to headings docs/method.md does not have (add the heading or fix "
                        "the link):\n  " + "\n  ".join(dangling))


def test_link_scanner_finds_links(tmp_path):
  # The scanner must see a link in a .py comment, else the test above could never fail.
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "method.md").write_text("# Method\n## Minibatch CKA\n")
  link = "docs/method.md" + "#"  # split, so that this file itself holds no link
  (tmp_path / "a.py").write_text(f"x = 1  # see {link}minibatch-cka\n# {link}nowhere.\n")
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "b.py").write_text(f"# {link}ignored\n")
  assert repo_links(tmp_path) == [("a.py", 1, "minibatch-cka"), ("a.py", 2, "nowhere")]
