"""Multi-process (multi-host) start-up: a thin wrapper of `jax.distributed.initialize`.

Run the same program in every process; call `initialize()` before anything else touches JAX devices:

    # host 0 (coordinator) and host 1, e.g. 2 hosts x 2 GPUs = tp 4:
    python my_decode.py --coordinator host0:12345 --num-processes 2 --process-id 0
    python my_decode.py --coordinator host0:12345 --num-processes 2 --process-id 1

    import polar_jax
    polar_jax.distributed.initialize(coordinator, num_processes=2, process_id=rank)
    mesh = polar_jax.sharding.make_mesh(tp=4)             # over jax.devices(): every process's devices
    model = polar_jax.load_model(path, mesh=mesh)          # each process restores only its shards
    out = polar_jax.generate(model, prompts, max_new_tokens=64)   # same prompts in every process

Under Slurm, Open MPI or Kubernetes (JobSet) the arguments can be omitted: JAX detects them.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, cpu_collectives: str | None = "gloo",
               **kwargs) -> None:
  """`jax.distributed.initialize(...)`, plus CPU collectives for multi-process runs on CPU.

  Args:
    coordinator_address: "host:port" of process 0 (None: auto-detect from the cluster environment).
    num_processes, process_id: the job size and this process's rank (None: auto-detect).
    local_device_ids: the devices this process uses (e.g. one GPU per process), or None for all.
    cpu_collectives: on CPU, the cross-process collectives implementation (`jax_cpu_collectives_implementation`,
      "gloo" by default; None leaves JAX's setting alone). Ignored on GPU/TPU, which use NCCL / ICI.
    **kwargs: passed on to `jax.distributed.initialize`.
  """
  if cpu_collectives and _cpu_only():
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                             **kwargs)


def _cpu_only() -> bool:
  import os
  platforms = os.environ.get("JAX_PLATFORMS") or str(jax.config.jax_platforms or "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  try:  # no platform forced: CPU unless a GPU/TPU plugin is installed
    import importlib.util
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
  except Exception:  # noqa: BLE001
    return True


def shutdown() -> None:
  jax.distributed.shutdown()
