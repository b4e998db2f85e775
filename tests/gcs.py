"""A real Cloud Storage API server on localhost for the gs:// tests (`gcp-storage-emulator`).

`emulator()` starts `python -m gcp_storage_emulator` on a free port with one bucket and returns
the environment that points every client of a run at it:

* gcsfs (what `etils.epath` opens `gs://` with, without TensorFlow): `STORAGE_EMULATOR_HOST`,
  anonymous credentials (`FSSPEC_GCS_TOKEN=anon`, read by fsspec's config) and its plain
  JSON-API file system (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: the experimental one first asks
  a gRPC control API that the emulator lacks, and waits 60 s for it per bucket);
* tensorstore (orbax's checkpoints): `TENSORSTORE_GCS_HTTP_URL`; it sends no credentials where
  none are configured, which the emulator accepts;
* etils.epath: `EPATH_USE_TF=false`, so that an installed TensorFlow is not used for gs://.

These variables are set only by the tests.
"""
from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import tempfile
import time
import urllib.request

import helpers

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
  port = helpers.free_port()
  url = f"http://127.0.0.1:{port}"
  # Its request log goes to a file: an unread pipe would fill and stall every client.
  log = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
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
