"""notebooks/explore.ipynb runs top to bottom offline in smoke mode and shows its figures and the
saved results as one table (`vit_analysis.results.load`)."""
import os

import nbformat
from nbclient import NotebookClient

_NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", "explore.ipynb")


def test_notebook_executes_in_smoke_mode(tmp_path, monkeypatch):
  monkeypatch.setenv("VIT_ANALYSIS_SMOKE", "1")
  monkeypatch.setenv("VIT_ANALYSIS_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("VIT_ANALYSIS_CHECKPOINT", "")
  monkeypatch.setenv("VIT_ANALYSIS_DEMO", "")  # the demo's cka_intra at smoke size, run there
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(_NOTEBOOK)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) == 3  # CKA heatmap, attention distances, probe accuracies
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "block01" in text and "test accuracy" in text
  # vit_analysis.results.load's table of the demo run: its head, then the CKA cells pivoted.
  tables = [o.data["text/html"] for o in outputs
            if o.output_type == "display_data" and "text/html" in o.data]
  assert len(tables) == 1 and "linear_cka" in tables[0] and "cka_intra" in tables[0]
  assert "layer_b" in text and "embedding" in text


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
