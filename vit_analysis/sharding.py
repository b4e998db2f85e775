"""Device mesh, batch sharding and multi-host start-up. Nothing model-specific lives here.

Every jitted step in the package runs under one 1-D mesh whose single axis, `data`, splits the
leading (batch or minibatch) axis of its inputs over all devices of all processes. The same code
runs on one CPU, on 4 simulated CPU devices and on a TPU pod slice.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
