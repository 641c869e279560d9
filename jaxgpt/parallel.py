"""Devices: the multi-process runtime, one (data, fsdp) mesh, its shardings, GPU determinism.

The model code never mentions devices. Sharding is declared here, once, at the edges:
- the batch is split over every device (both mesh axes);
- parameters and optimizer state are replicated over `data` and, with `fsdp` > 1, split over
  `fsdp` along their largest evenly divisible dimension (XLA inserts the all-gathers);
- with several processes (`jax.distributed`), each process builds only its own rows of each
  global batch, and the arrays span every process's devices.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt.config import ConfigError

AXES = ("data", "fsdp")


# ---- processes ----------------------------------------------------------------------------------
def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int = 60) -> None:
    """Join JAX's distributed runtime. `coordinator` is HOST:PORT, or "auto" to let JAX detect
    the cluster (TPU pods, SLURM, ...). Nothing happens for a single-process run (None)."""
    if coordinator is None:
        return
    if coordinator != "auto" and (num_processes is None or process_id is None):
        raise ConfigError("--coordinator HOST:PORT needs --num-processes and --process-id")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if coordinator != "auto" and process_id != 0:
        # JAX's client aborts the whole process (no exception) when the coordinator never answers:
        # check that it is reachable first, so the user gets one clear line instead of a crash.
        _wait_for_coordinator(coordinator, timeout_s)
    # CPU processes exchange data through gloo (a no-op for GPU/TPU backends)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {} if coordinator == "auto" else dict(coordinator_address=coordinator,
                                               num_processes=num_processes, process_id=process_id)
    try:
        jax.distributed.initialize(**kw, initialization_timeout=timeout_s)
    except Exception as e:  # connection refused, timeout, bad address, no cluster detected
        where = "auto-detect a cluster" if coordinator == "auto" else f"reach the coordinator {coordinator}"
        raise ConfigError(f"could not {where} within {timeout_s} s "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Poll HOST:PORT until it accepts a TCP connection; ConfigError after timeout_s."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"could not reach the coordinator {address} within {timeout_s} s "
                                  f"({e.strerror or e}); is process 0 running there? "
                                  f"(--init-timeout sets the wait)") from None
            time.sleep(0.5)


def is_main() -> bool:
    """True in the process that writes logs, metrics and plots (process 0)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True if `flag` is True in any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def to_host(x) -> np.ndarray:
    """A replicated (e.g. metrics) array as numpy, in any process."""
    return np.asarray(x.addressable_data(0))


# ---- the mesh -----------------------------------------------------------------------------------
def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """"data=2,fsdp=2" -> {"data": 2, "fsdp": 2}; empty: everything on `data`. One axis may be -1."""
    sizes = {"data": -1, "fsdp": 1}
    if spec:
        sizes = {"data": 1, "fsdp": 1}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            if name.strip() not in AXES or not value.strip().lstrip("-").isdigit():
                raise ConfigError(f"--mesh {spec!r}: expected e.g. data=2,fsdp=2 (axes: data, fsdp)")
            sizes[name.strip()] = int(value)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"--mesh {spec!r}: sizes must be positive (at most one -1)")
    if free:
        rest = math.prod(v for v in sizes.values() if v != -1)
        sizes[free[0]] = n_devices // rest if n_devices % rest == 0 else 0
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"--mesh {spec!r} has {math.prod(sizes.values())} devices but "
                          f"{n_devices} are available")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over every device of every process."""
    devices = devices if devices is not None else jax.devices()
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh((sizes["data"], sizes["fsdp"]), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def n_shards(mesh) -> int:
    """Number of pieces a batch is cut into: every device gets its own rows."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
    """Each micro-batch must split evenly over all devices."""
    n = n_shards(mesh)
    micro = batch_size // grad_accum
    if micro % n:
        raise ConfigError(f"micro-batch of {micro} sequences (--batch-size {batch_size} / --grad-accum "
                          f"{grad_accum}) does not split over {n} devices; use a multiple of {n}")


# ---- shardings ----------------------------------------------------------------------------------
def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shard axis `batch_axis` of an ndim-array over all devices; other axes whole."""
    spec = [None] * ndim
    spec[batch_axis] = AXES
    return NamedSharding(mesh, P(*spec))


def param_sharding(mesh, shape) -> NamedSharding:
    """FSDP: split the largest dimension divisible by the fsdp size; replicate otherwise."""
    n = mesh.shape["fsdp"]
    dims = [i for i in np.argsort(shape)[::-1] if n > 1 and shape[i] % n == 0]
    if not dims:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def state_shardings(mesh, tree):
    """The sharding of every leaf of a params / optimizer-state tree (by shape)."""
    return jax.tree.map(lambda x: param_sharding(mesh, x.shape), tree)


def put_global(tree, shardings):
    """Host arrays (identical in every process) -> global arrays with the given shardings."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def local_rows(sharding: NamedSharding, global_shape, batch_axis: int) -> slice:
    """The rows (along batch_axis) of a global array that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
    starts = [i[batch_axis].start or 0 for i in idx]
    stops = [i[batch_axis].stop if i[batch_axis].stop is not None else global_shape[batch_axis] for i in idx]
    return slice(min(starts), max(stops))


def shard_batch(mesh, array, batch_axis: int = 0, global_shape=None):
    """A batch onto the mesh, split along its batch axis.

    `array` holds either the whole global batch (one process), or, with `global_shape`
    given, only this process's rows (`local_rows`).
    """
    sharding = batch_sharding(mesh, np.ndim(array), batch_axis)
    if global_shape is None:
        global_shape = np.shape(array)
        array = np.asarray(array)[(slice(None),) * batch_axis + (local_rows(sharding, global_shape, batch_axis),)]
    return jax.make_array_from_process_local_data(sharding, np.asarray(array), tuple(global_shape))


def deterministic_gpu_ops():
    """Same seed, same losses on a GPU too: XLA's GPU scatter-add (the embedding gradient) uses
    atomics by default, so two identical runs drifted apart in the 4th digit within 300 steps
    (measured on an H200, README "Performance"). This asks XLA for its deterministic kernels. It
    only works before JAX starts its backends, so the CLIs call it first (train: unless
    --no-deterministic); XLA_FLAGS that already name the option win. No effect on CPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{DETERMINISTIC_FLAG}".strip()


DETERMINISTIC_FLAG = "xla_gpu_deterministic_ops=true"


def gpu_ops_deterministic() -> bool:
    """Whether XLA_FLAGS ask for deterministic GPU kernels (set by deterministic_gpu_ops or by hand)."""
    return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "")


# dense 16-bit matmul peak per chip, FLOP/s, from the vendors' data sheets (for MFU)
PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
             "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
             "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12}


def peak_flops(dtype: str) -> float | None:
    """The mesh's summed 16-bit matmul peak, for MFU; None where it is not known (CPUs, other
    chips) or the compute is float32."""
    if dtype not in ("bfloat16", "float16"):
        return None
    kind = jax.devices()[0].device_kind.lower()
    for name in sorted(PEAK_BF16, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_BF16[name] * jax.device_count()
    return None
