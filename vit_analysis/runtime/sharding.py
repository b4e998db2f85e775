"""Device mesh, batch sharding and multi-host start-up. Nothing model-specific lives here.

Every jitted step in the package runs under one 1-D mesh whose single axis, `data`, splits the
leading (batch or minibatch) axis of its inputs over all devices of all processes. The same code
runs on one CPU, on 4 simulated CPU devices and on a TPU pod slice.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all global devices) with the axis `data`.

  The axis type is Auto: jax 0.10's `jax.make_mesh` defaults to Explicit axes, under which a
  jitted reduction over a batch-sharded axis raises `ShardingTypeError`.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array whose leading axis is split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host-local pytree of arrays `[local_batch, ...]` onto the mesh, split on axis 0.

  On one process this is `jax.device_put`; with several processes each host passes its own
  slice and the global array is `[process_count * local_batch, ...]`.

  Raises:
    ValueError: if a leading dimension is not divisible by the local device count.
  """
  local = jax.local_device_count()
  sharding = data_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local:
      raise ValueError(
          f"leading dimension {x.shape[:1]} of an array of shape {x.shape} must be divisible "
          f"by the {local} local devices")
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def host_rows(mesh: Mesh, global_rows: int) -> slice:
  """The rows of a `[global_rows, ...]` array split on `data` that this process's devices hold.

  Derived from the sharding itself, so it is right for any device order; for `make_mesh()`'s
  process-major order it is rows `process_index * global_rows / process_count` onwards.

  Raises:
    ValueError: if `global_rows` is not divisible by the mesh's devices, or this process's rows
      are not one contiguous block (a mesh whose device order interleaves processes).
  """
  devices = mesh.devices.size
  if global_rows <= 0 or global_rows % devices:
    raise ValueError(f"{global_rows} rows cannot be split evenly over the {devices} devices of "
                     "the mesh")
  index_map = data_sharding(mesh).addressable_devices_indices_map((global_rows,))
  rows = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                 for s in index_map.values()})
  for (_, stop), (start, _) in itertools.pairwise(rows):
    if stop != start:
      raise ValueError(f"this process's devices hold rows {rows} of the batch, not one "
                       "contiguous block; build the mesh with sharding.make_mesh()")
  if not rows:
    raise ValueError("this process holds no device of the mesh")
  return slice(rows[0][0], rows[-1][1])


def global_array(local: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
  """A `[global_rows, ...]` array split on `data` from this process's rows `host_rows(...)`.

  One process: `jax.device_put`; several: `jax.make_array_from_process_local_data`.
  """
  local = np.asarray(local)
  rows = host_rows(mesh, global_rows)
  if local.ndim == 0 or local.shape[0] != rows.stop - rows.start:
    raise ValueError(f"process-local array of shape {local.shape} must have the "
                     f"{rows.stop - rows.start} rows {rows.start}:{rows.stop} of {global_rows}")
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local,
                                                (global_rows,) + local.shape[1:])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. parameters) whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
  """Joins a multi-process run when asked.

  `enabled=None` reads the environment: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID), or a TPU VM pod slice where `jax.distributed.initialize()` discovers the rest
  on its own (VIT_ANALYSIS_DISTRIBUTED=1). Safe to call twice.
  """
  if enabled is None:
    enabled = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
        os.environ.get("VIT_ANALYSIS_DISTRIBUTED") == "1")
  if not enabled or jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info("joined distributed run: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())


def is_main_process() -> bool:
  """Only process 0 writes files."""
  return jax.process_index() == 0
