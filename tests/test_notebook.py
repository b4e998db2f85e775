"""notebooks/explore.ipynb runs top to bottom offline in smoke mode and shows its figures."""
import os

import nbformat
from nbclient import NotebookClient

_NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", "explore.ipynb")


def test_notebook_executes_in_smoke_mode(tmp_path, monkeypatch):
  monkeypatch.setenv("VIT_ANALYSIS_SMOKE", "1")
  monkeypatch.setenv("VIT_ANALYSIS_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("VIT_ANALYSIS_CHECKPOINT", "")
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


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(_NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
