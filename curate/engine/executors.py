"""Where shard tasks run: in this process (default), or on dask.distributed workers.

Tasks are top-level functions of picklable arguments and return small dicts; results come back in task
order, so the output never depends on the executor."""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable, Sequence

from tqdm.auto import tqdm


def stage_bar(items: Sequence, desc: str, cost: tuple[list[int], str] | None):
    """The stage's progress bar: in its units of work (`cost`: one amount per item and the unit, e.g.
    tokens), so that its rate (tokens/s) and ETA are the whole stage's; else in shards (two or more)."""
    if cost is None:
        return tqdm(total=len(items), desc=desc, unit="shard", disable=len(items) < 2)
    amounts, unit = cost
    return tqdm(total=sum(amounts), desc=desc, unit=unit, unit_scale=True, disable=not items)


class LocalExecutor:
    """Runs every task in this process, one after another (the default)."""

    def map(self, fn: Callable, items: Sequence, desc: str = "", gpu: bool = False,
            cost: tuple[list[int], str] | None = None) -> list:
        """`fn(item)` for each item, in order, under one progress bar (`stage_bar`); `gpu` changes nothing here."""
        out = []
        with stage_bar(items, desc, cost) as bar:
            for k, item in enumerate(items):
                out.append(fn(item))
                bar.update(cost[0][k] if cost else 1)
        return out

    def close(self) -> None:
        """Nothing to release."""
        pass


class DaskExecutor:
    """--workers N: a LocalCluster of N processes, one task at a time each (torch with this process's thread
    count); with `cuda`, one such process per GPU instead, each pinned to its GPU and declaring the worker
    resource GPU=1 (engine.gpu_cluster: at most one per GPU, a warning when N is more).
    --scheduler ADDR: an existing cluster (start one worker per GPU there, each with GPU=1).
    GPU stages ask for the resource GPU=1 on a local GPU cluster, and on an existing cluster when one of
    its workers declares it (else they run on any worker rather than wait forever)."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None, cuda: bool = False):
        from dask.distributed import Client, LocalCluster

        if scheduler:
            self.client, self.cluster = Client(scheduler), None
            self.threads = None  # an existing cluster's workers keep the thread count they were started with
        else:
            # dask gives single-threaded workers OMP/MKL/OpenBLAS_NUM_THREADS=1; a float32 matmul sums in
            # another order with another thread count (1 ulp apart), so workers get this process's count
            env = {k: str(_torch_threads()) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            # and each task sets it too: torch reads the variables when it is first imported, which a worker may
            # do while it starts, before `env` arrives (spawn runs a calling script's imports again), and caps
            # what they ask at the machine's cores
            self.threads = _torch_threads()
            if cuda:
                from curate.engine.gpu_cluster import local_gpu_cluster, worker_devices

                self.cluster = local_gpu_cluster(workers, env)
                self.client = Client(self.cluster)
                worker_devices(self.client)  # logs which worker got which GPU
            else:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, env=env)
                self.client = Client(self.cluster)
        self.remote = scheduler is not None
        if not self.remote:
            # curate's warnings raised in a worker (a probe falling back from strict determinism, say) are
            # handled here, by this process's handlers: the console and --log-file, not only a worker's stderr.
            # Not on a cluster others share: its workers' records would reach every client connected to it
            self.client.forward_logging("curate", level=logging.WARNING)
        # where workers declare GPU=1: a local GPU cluster, or an existing cluster with such workers (on one
        # without, a task asking for GPU=1 would wait forever)
        self.gpu_workers = declares_gpu(self.client) if self.remote else cuda

    def map(self, fn: Callable, items: Sequence, desc: str = "", gpu: bool = False,
            cost: tuple[list[int], str] | None = None) -> list:
        """`fn(item)` for each item on the cluster, results in item order (a task's exception is raised here),
        the stage's progress bar advancing as tasks finish. `gpu`: on an existing cluster or a local GPU
        cluster, each task asks for a worker with the resource GPU=1 (one task per GPU at a time); other
        tasks run on any worker."""
        from dask.distributed import as_completed

        resources = {"GPU": 1} if gpu and self.gpu_workers else None
        task = partial(on_own_gpu, fn) if resources else fn
        task = partial(with_torch_threads, self.threads, task) if self.threads else task
        futures = self.client.map(task, list(items), pure=False, resources=resources)
        position = {f.key: k for k, f in enumerate(futures)}
        with stage_bar(items, desc, cost) as bar:
            for done in as_completed(futures):
                bar.update(cost[0][position[done.key]] if cost else 1)
        return self.client.gather(futures)

    def close(self) -> None:
        """Close the client and the local cluster this executor started (an existing cluster keeps running)."""
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def declares_gpu(client) -> bool:
    """Whether any worker of `client`'s cluster declares the resource GPU."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(w.get("resources", {}).get("GPU") for w in workers.values())


def with_torch_threads(threads: int, fn: Callable, item):
    """fn(item) with torch using `threads` intra-op threads in this worker process."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(item)


def on_own_gpu(fn: Callable, item):
    """fn(item) in a GPU task: the process marks that it owns its current GPU only (models.SINGLE_GPU), so a
    model never spreads onto GPUs that other workers hold (dask-cuda lists them after the worker's own)."""
    import os

    from curate.models import SINGLE_GPU

    # this one key restored, not the whole environment (unittest.mock.patch.dict would also undo what the
    # task set, such as load_model's CUBLAS_WORKSPACE_CONFIG for the model it keeps cached)
    before = os.environ.get(SINGLE_GPU)
    os.environ[SINGLE_GPU] = "1"
    try:
        return fn(item)
    finally:  # a worker runs one GPU task at a time; an in-process cluster must not keep the flag
        if before is None:
            os.environ.pop(SINGLE_GPU, None)
        else:
            os.environ[SINGLE_GPU] = before


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def make_executor(workers: int | None, scheduler: str | None, cuda: bool = False):
    """A DaskExecutor for --scheduler or --workers N > 0 (ImportError without dask.distributed), else a
    LocalExecutor. `cuda`: the job runs its models on CUDA, so --workers starts one worker per GPU."""
    if scheduler or (workers and workers > 0):
        return DaskExecutor(workers, scheduler, cuda)
    return LocalExecutor()
