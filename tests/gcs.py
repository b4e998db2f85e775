"""A real Cloud Storage API server on localhost for the gs:// tests (`gcp-storage-emulator`).

`emulator()` starts `python -m gcp_storage_emulator` on a free port with one bucket and returns
the environment that points every client of a run at it:

* gcsfs (what `etils.epath` opens `gs://` with, without TensorFlow): `STORAGE_EMULATOR_HOST`,
  anonymous credentials (`FSSPEC_GCS_TOKEN=anon`, read by fsspec's config) and its plain
  JSON-API file system (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: the experimental one first asks
  a gRPC control API that the emulator lacks, and waits 60 s for it per bucket);
* tensorstore (orbax's checkpoints): `TENSORSTORE_GCS_HTTP_URL`; it sends no credentials where
  none are configured, which the emulator accepts. Cloud Storage names an object's generation
  in the `x-goog-generation` header of every download; the emulator leaves it out, and
  tensorstore then fails every read with "Malformed StorageGeneration". The server is therefore
  started through this file (`_serve`), which adds the header (and `x-goog-metageneration`)
  from the object's metadata before the emulator builds its routes: orbax checkpoints then
  write and restore on the emulator as on Cloud Storage;
* etils.epath: `EPATH_USE_TF=false`, so that an installed TensorFlow is not used for gs://.

These variables are set only by the tests.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

BUCKET = "bucket"


def missing() -> str | None:
  """Why the emulator cannot run here (a missing package), or None."""
  for module, package in (("gcp_storage_emulator", "gcp-storage-emulator"), ("gcsfs", "gcsfs")):
    if importlib.util.find_spec(module) is None:
      return f"{package} is not installed (pip install -e '.[dev]')"
  return None


def environment(url: str) -> dict[str, str]:
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "EPATH_USE_TF": "false", "GOOGLE_CLOUD_PROJECT": "test"}


@contextlib.contextmanager
def emulator(timeout_s: float = 30.0):
  """Runs the server; yields (url, env) or raises RuntimeError naming why it did not start."""
  import helpers  # pylint: disable=g-import-not-at-top  (JAX: not in the server's process)
  port = helpers.free_port()
  url = f"http://127.0.0.1:{port}"
  # Its request log goes to a file: an unread pipe would fill and stall every client.
  log = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=log, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      if proc.poll() is not None:
        log.seek(0)
        raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}: "
                           f"{log.read()[-1000:]}")
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).close()
        break
      except OSError:
        if time.monotonic() > deadline:
          raise RuntimeError(f"gcp-storage-emulator did not answer on {url} in {timeout_s} s")
        time.sleep(0.2)
    yield url, environment(url)
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def _serve(argv: list[str]) -> None:
  """`python -m gcp_storage_emulator` with the generation headers of Cloud Storage downloads."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj.get("generation") or "1")
      response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")
    except Exception:  # pylint: disable=broad-except  (absent: the emulator answers 404)
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # before the server module builds its routes
  from gcp_storage_emulator import __main__ as emulator_main  # pylint: disable=g-import-not-at-top
  emulator_main.main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
