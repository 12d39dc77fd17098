"""A local dask cluster of one worker process per GPU (`--workers N` on a CUDA run).

Each worker is pinned to its own GPU through CUDA_VISIBLE_DEVICES, runs one thread and declares the
worker resource GPU=1, so a task that asks for GPU=1 (a stage that runs a model) lands on exactly one
GPU and every GPU holds one copy of the model. With dask-cuda installed its LocalCUDACluster starts the
workers (it also sets each worker's CPU affinity near its GPU); without it, `LocalGPUCluster` builds the
same topology from distributed's own LocalCluster."""

from __future__ import annotations

import logging
import os

from distributed import LocalCluster, Nanny
from distributed.worker_memory import parse_memory_limit

log = logging.getLogger(__name__)

GPU = {"GPU": 1}  # the worker resource every GPU worker declares and every model-running task asks for


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs): the
    entries of this process's CUDA_VISIBLE_DEVICES when it is set ("2,5" -> ["2", "5"]), else "0" up to
    torch's device count. Cut to torch.cuda.device_count(), since CUDA ignores the entries from the first
    one that names no device on. Empty when torch sees no GPU."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def local_gpu_cluster(n_workers: int | None, env: dict[str, str]) -> LocalCluster:
    """A started local cluster of one worker per GPU on the first min(n_workers, GPUs) of `visible_gpus()`
    (n_workers None: every GPU). Each worker has one thread, the resource GPU=1, and `env` (the thread
    counts) besides its CUDA_VISIBLE_DEVICES. Workers past the GPU count are not started, with a warning:
    a second worker on a GPU would load a second copy of the model into the same memory. dask-cuda's
    workers see their own GPU first and the cluster's other GPUs after it; `LocalGPUCluster`'s see only
    their own. RuntimeError when torch sees no GPU."""
    devices = visible_gpus()
    if not devices:
        raise RuntimeError("a GPU cluster was asked for, but torch sees no CUDA device")
    n_workers = n_workers or len(devices)
    if n_workers > len(devices):
        log.warning(f"--workers {n_workers}: this machine has {len(devices)} GPU(s) "
                    f"({','.join(devices)}); starting {len(devices)} worker(s), one per GPU")
    devices = devices[:n_workers]
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return LocalGPUCluster(devices, env)
    # LocalCUDACluster sets each worker spec's `env` to its CUDA_VISIBLE_DEVICES alone, so the rest of
    # `env` travels on the Nanny class
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, n_workers=len(devices), threads_per_worker=1,
                            resources=dict(GPU), dashboard_address=None, worker_class=nanny_with_env(env))


class LocalGPUCluster(LocalCluster):
    """A LocalCluster of one worker process (a Nanny) per device in `devices`: the worker of device D
    (named "gpu-D", `worker_name`) runs with CUDA_VISIBLE_DEVICES=D (that GPU only, so it is cuda:0 there
    and the worker can touch no other), one thread, the resource GPU=1 and `env`. Built as dask-cuda's
    LocalCUDACluster is: a scheduler with no workers, then one `new_worker_spec` per device. A worker that
    fails to start raises its error here, with the cluster closed. Scaling past the devices raises
    ValueError."""

    def __init__(self, devices: list[str], env: dict[str, str]):
        self.devices = list(devices)
        # LocalCluster splits the memory among n_workers only when n_workers > 0; split it among the GPUs
        memory_limit = parse_memory_limit("auto", 1, len(self.devices), logger=log)
        super().__init__(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                         resources=dict(GPU), env=env, memory_limit=memory_limit)
        try:
            # as SpecCluster.__init__ starts its initial workers: the spec, then one _correct_state that
            # raises a worker's start error (scale() would start them in a task whose error nobody sees)
            for _ in self.devices:
                self.worker_spec.update(self.new_worker_spec())
            self.sync(self._correct_state)
        except BaseException:
            self.close()
            raise

    def new_worker_spec(self) -> dict:
        """{worker name: the LocalCluster worker spec with CUDA_VISIBLE_DEVICES=D added to its env} for the
        first device D without a worker."""
        free = [d for d in self.devices if worker_name(d) not in self.worker_spec]
        if not free:
            raise ValueError(f"every GPU ({','.join(self.devices)}) already has a worker")
        options = self.new_spec["options"]
        env = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": free[0]}
        return {worker_name(free[0]): {**self.new_spec, "options": {**options, "env": env}}}


def worker_name(device: str) -> str:
    """The name of the worker of GPU `device`: "gpu-2" for an index, the UUID itself (GPU-..., MIG-...)."""
    return f"gpu-{device}" if device.isdigit() else device


def nanny_with_env(extra: dict[str, str]) -> type[Nanny]:
    """A Nanny subclass whose worker process gets `extra` under the environment its spec gives (the
    spec's variables win)."""

    class EnvNanny(Nanny):
        def __init__(self, *args, env=None, **kwargs):
            super().__init__(*args, env={**extra, **(env or {})}, **kwargs)

    return EnvNanny


def worker_devices(client) -> dict[str, str | None]:
    """{worker name: its CUDA_VISIBLE_DEVICES}, as each worker of `client`'s cluster reports it; each is
    logged."""
    seen = dict(client.run(_name_and_devices).values())
    for name, devices in sorted(seen.items(), key=str):
        log.info(f"dask worker {name}: CUDA_VISIBLE_DEVICES={devices}")
    return seen


def _name_and_devices(dask_worker) -> tuple[str, str | None]:
    """Run on a worker (client.run passes it as `dask_worker`): its name and CUDA_VISIBLE_DEVICES."""
    return str(dask_worker.name), os.environ.get("CUDA_VISIBLE_DEVICES")
