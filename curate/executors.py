"""Where shard tasks run: in this process (default), or on dask.distributed workers.

Tasks are top-level functions of picklable arguments and return small dicts; results come back in task
order, so the output never depends on the executor."""

from __future__ import annotations

from typing import Callable, Sequence

from tqdm.auto import tqdm


class LocalExecutor:
    def map(self, fn: Callable, items: Sequence, desc: str = "", gpu: bool = False) -> list:
        return [fn(x) for x in tqdm(items, desc=desc, unit="shard", disable=len(items) < 2)]

    def close(self) -> None:
        pass


class DaskExecutor:
    """--workers N: a LocalCluster of N single-threaded processes; --scheduler ADDR: an existing cluster.
    GPU stages ask for the worker resource GPU=1 on an existing cluster (start one worker per GPU)."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        from dask.distributed import Client, LocalCluster

        if scheduler:
            self.client, self.cluster = Client(scheduler), None
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        self.remote = scheduler is not None

    def map(self, fn: Callable, items: Sequence, desc: str = "", gpu: bool = False) -> list:
        resources = {"GPU": 1} if gpu and self.remote else None
        futures = self.client.map(fn, list(items), pure=False, resources=resources)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(workers: int | None, scheduler: str | None):
    if scheduler or (workers and workers > 0):
        return DaskExecutor(workers, scheduler)
    return LocalExecutor()
