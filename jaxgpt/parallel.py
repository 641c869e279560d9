"""Device layout: one `data` mesh over all devices; batches sharded on it, parameters replicated."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt.config import ConfigError


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over every device (all local devices of every process)."""
    devices = devices if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def check_batch(batch_size: int, grad_accum: int, mesh: jax.sharding.Mesh) -> None:
    """Each micro-batch must split evenly over the data axis."""
    n = mesh.shape["data"]
    micro = batch_size // grad_accum
    if micro % n:
        raise ConfigError(f"micro-batch of {micro} sequences (--batch-size {batch_size} / --grad-accum "
                          f"{grad_accum}) does not split over {n} devices; use a multiple of {n}")


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shard axis `batch_axis` of an ndim-array over `data`; other axes replicated."""
    spec = [None] * ndim
    spec[batch_axis] = "data"
    return NamedSharding(mesh, P(*spec))


def shard_batch(mesh, array, batch_axis: int = 0):
    """Put a host (numpy) batch onto the mesh, split along its batch axis."""
    return jax.device_put(array, batch_sharding(mesh, array.ndim, batch_axis))
