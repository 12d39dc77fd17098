"""`--workers N` on a CUDA run: one dask worker process per GPU, each pinned by CUDA_VISIBLE_DEVICES, one
thread, resource GPU=1 (curate/engine/gpu_cluster.py). On CPU: torch's GPU count is faked in this
process; the workers are real processes that only report their environment."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import pytest

from curate.engine import gpu_cluster
from curate.engine.executors import make_executor

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# Run on the workers (module-level, so that they unpickle by reference)
def worker_env(dask_worker) -> dict:
    return {"name": str(dask_worker.name), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": {k: os.environ.get(k) for k in THREAD_VARS}, "nthreads": dask_worker.state.nthreads,
            "resources": dict(dask_worker.state.total_resources)}


def visible_devices(_=None) -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def single_gpu_flag(_) -> str | None:
    return os.environ.get("CURATE_SINGLE_GPU")


def task_resources(_) -> dict:
    from distributed import get_worker

    worker = get_worker()
    return dict(worker.state.tasks[worker.get_current_task()].resource_restrictions or {})


@pytest.fixture
def gpus(monkeypatch):
    """fake(n, visible=None): torch in this process sees n GPUs; CUDA_VISIBLE_DEVICES is `visible` (None:
    unset); dask_cuda cannot be imported, unless a test puts its own in sys.modules afterwards."""
    import dask
    import torch

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import dask_cuda -> ImportError

    def fake(n: int, visible: str | None = None):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    # workers pass their CUDA_VISIBLE_DEVICES to NVML for dask's GPU dashboard; a faked GPU fails there
    # on a machine with fewer real ones (workers get this process's dask config)
    with dask.config.set({"distributed.diagnostics.nvml": False}):
        yield fake


def workers_report(executor) -> dict[str, dict]:
    """{worker name: worker_env} from every worker of the executor's cluster."""
    return {r["name"]: r for r in executor.client.run(worker_env).values()}


def test_visible_gpus(gpus):
    gpus(3)
    assert gpu_cluster.visible_gpus() == ["0", "1", "2"]
    gpus(2, "2,5")
    assert gpu_cluster.visible_gpus() == ["2", "5"]
    gpus(2, " GPU-8f2e ,MIG-1a")
    assert gpu_cluster.visible_gpus() == ["GPU-8f2e", "MIG-1a"]
    gpus(2, "3,1,7")  # CUDA stops at the first entry that names no device: torch counts 2
    assert gpu_cluster.visible_gpus() == ["3", "1"]
    gpus(0, "")
    assert gpu_cluster.visible_gpus() == []
    assert [gpu_cluster.worker_name(d) for d in ("2", "GPU-8f2e")] == ["gpu-2", "GPU-8f2e"]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        gpu_cluster.local_gpu_cluster(2, {})


def test_one_worker_per_gpu(gpus, caplog):
    import torch

    gpus(2)
    caplog.set_level(logging.INFO, logger=gpu_cluster.__name__)
    executor = make_executor(2, None, cuda=True)
    try:
        report = workers_report(executor)
        client = executor.client
        # a task placed on each worker sees that worker's GPU alone
        placed = {addr: client.submit(visible_devices, workers=[addr], pure=False).result()
                  for addr in client.scheduler_info()["workers"]}
        gpu_tasks = executor.map(task_resources, range(6), gpu=True)
        other_tasks = executor.map(task_resources, range(4), gpu=False)
        flags = executor.map(single_gpu_flag, range(4), gpu=True)  # a GPU task owns its GPU alone
    finally:
        executor.close()
    assert {name: r["devices"] for name, r in report.items()} == {"gpu-0": "0", "gpu-1": "1"}
    assert sorted(placed.values()) == ["0", "1"]
    threads = str(torch.get_num_threads())
    for r in report.values():
        assert r["nthreads"] == 1 and r["resources"] == {"GPU": 1}
        assert r["threads"] == {k: threads for k in THREAD_VARS}  # the thread env DaskExecutor always passed
    assert gpu_tasks == [{"GPU": 1}] * 6 and other_tasks == [{}] * 4
    assert flags == ["1"] * 4
    assert "dask worker gpu-0: CUDA_VISIBLE_DEVICES=0" in caplog.text
    assert "dask worker gpu-1: CUDA_VISIBLE_DEVICES=1" in caplog.text


def test_parent_visible_devices_and_more_workers_than_gpus(gpus, caplog):
    gpus(2, "2,5")
    caplog.set_level(logging.INFO, logger=gpu_cluster.__name__)
    executor = make_executor(8, None, cuda=True)
    try:
        report = workers_report(executor)
    finally:
        executor.close()
    assert {name: r["devices"] for name, r in report.items()} == {"gpu-2": "2", "gpu-5": "5"}
    assert "--workers 8: this machine has 2 GPU(s) (2,5); starting 2 worker(s)" in caplog.text


def test_cpu_run_keeps_a_plain_local_cluster(gpus):
    gpus(2, "0,1")  # even where GPUs are visible, a CPU run does not pin or tag its workers
    executor = make_executor(2, None, cuda=False)
    try:
        report = workers_report(executor)
        tasks = executor.map(task_resources, range(4), gpu=True)
    finally:
        executor.close()
    assert len(report) == 2
    assert all(r["devices"] == "0,1" and r["resources"] == {} and r["nthreads"] == 1 for r in report.values())
    assert tasks == [{}] * 4


def test_a_worker_that_fails_to_start_fails_the_cluster(gpus, monkeypatch):
    gpus(2)
    spec = gpu_cluster.LocalGPUCluster.new_worker_spec
    closed = []

    def broken_second(self):  # the worker of GPU 1 preloads a module that does not exist
        (name, worker), = spec(self).items()
        if name == "gpu-1":
            worker = {**worker, "options": {**worker["options"], "preload": ["curate_no_such_module"]}}
        return {name: worker}

    monkeypatch.setattr(gpu_cluster.LocalGPUCluster, "new_worker_spec", broken_second)
    close = gpu_cluster.LocalGPUCluster.close
    monkeypatch.setattr(gpu_cluster.LocalGPUCluster, "close",
                        lambda self, *args, **kwargs: closed.append(self) or close(self, *args, **kwargs))
    with pytest.raises(RuntimeError, match="failed to start"):
        make_executor(2, None, cuda=True)
    assert closed


def fake_dask_cuda(monkeypatch, make_cluster) -> list[dict]:
    """Put a dask_cuda whose LocalCUDACluster records its keyword arguments and returns
    make_cluster(**kwargs) into sys.modules; the recorded calls."""
    calls = []

    def LocalCUDACluster(**kwargs):  # noqa: N802 (dask-cuda's name)
        calls.append(kwargs)
        return make_cluster(**kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    return calls


def test_dask_cuda_gets_the_gpus_one_thread_and_the_resource(gpus, monkeypatch):
    gpus(4, "0,1,2,3")
    calls = fake_dask_cuda(monkeypatch, lambda **kwargs: "cluster")
    assert gpu_cluster.local_gpu_cluster(2, {"OMP_NUM_THREADS": "3"}) == "cluster"
    (kwargs,) = calls
    assert kwargs["CUDA_VISIBLE_DEVICES"] == ["0", "1"]  # --workers 2 of 4 GPUs: the first two
    assert kwargs["n_workers"] == 2 and kwargs["threads_per_worker"] == 1
    assert kwargs["resources"] == {"GPU": 1} and kwargs["dashboard_address"] is None
    from distributed import Nanny

    assert issubclass(kwargs["worker_class"], Nanny)  # dask-cuda keeps a Nanny subclass as it is


def test_dask_cuda_workers_keep_the_thread_env(gpus, monkeypatch):
    """dask-cuda sets each worker spec's env to its rotated CUDA_VISIBLE_DEVICES alone; the thread counts
    still reach the worker (on the Nanny class)."""
    import torch
    from distributed import LocalCluster

    gpus(2)

    def like_dask_cuda(CUDA_VISIBLE_DEVICES, n_workers, **kwargs):  # noqa: N803
        return LocalCluster(n_workers=1, processes=True, env={"CUDA_VISIBLE_DEVICES": ",".join(CUDA_VISIBLE_DEVICES)},
                            **kwargs)

    calls = fake_dask_cuda(monkeypatch, like_dask_cuda)
    executor = make_executor(2, None, cuda=True)
    try:
        (report,) = workers_report(executor).values()
        tasks = executor.map(task_resources, range(2), gpu=True)
    finally:
        executor.close()
    assert len(calls) == 1 and calls[0]["CUDA_VISIBLE_DEVICES"] == ["0", "1"]
    assert report["devices"] == "0,1" and report["resources"] == {"GPU": 1} and report["nthreads"] == 1
    assert report["threads"] == {k: str(torch.get_num_threads()) for k in THREAD_VARS}
    assert tasks == [{"GPU": 1}] * 2


@pytest.mark.parametrize("gpu_workers", [False, True])
def test_an_existing_cluster_gets_gpu_tasks_only_if_a_worker_declares_gpu(gpu_workers):
    # a head node may have no GPU; a GPU=1 request on a cluster with no such worker would wait forever
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      resources={"GPU": 1} if gpu_workers else None) as cluster:
        executor = make_executor(None, cluster.scheduler_address, cuda=True)  # what a CUDA or auto job passes
        try:
            assert executor.gpu_workers is gpu_workers
            got = executor.map(task_resources, range(2), gpu=True)
        finally:
            executor.close()
    assert got == ([{"GPU": 1}] * 2 if gpu_workers else [{}] * 2)


SCRIPT_IMPORTING_TORCH = """
import json, torch
from curate.engine.executors import make_executor

def threads(_):
    import torch
    return torch.get_num_threads()

if __name__ == "__main__":
    torch.set_num_threads(3)
    executor = make_executor(1, None, cuda=False)
    try:
        print(json.dumps(executor.map(threads, [0])))
    finally:
        executor.close()
"""


def test_workers_run_torch_with_the_callers_thread_count_when_the_script_imports_torch(tmp_path):
    # a worker process runs the caller's script's imports again as it starts, before the worker's `env`
    # arrives: torch would fix its thread count from dask's pre-spawn OMP_NUM_THREADS=1 (a float32 matmul
    # then sums in another order than in the caller's process)
    import json
    import subprocess

    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT_IMPORTING_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [3]


def warn_in_a_worker(_):
    import logging

    logging.getLogger("curate.gradients").warning("probed without strict deterministic algorithms")
    return os.getpid()


def test_a_warning_logged_in_a_worker_reaches_this_process_handlers(caplog):
    # the console and --log-file are this process's handlers; a worker's own stderr is not the job's log
    import logging
    import time

    def forwarded():
        return [r.name for r in caplog.records if "strict deterministic" in r.getMessage()]

    executor = make_executor(1, None, cuda=False)
    try:
        with caplog.at_level(logging.WARNING, logger="curate"):
            (pid,) = executor.map(warn_in_a_worker, [0])
            deadline = time.monotonic() + 30  # records come as scheduler events, soon after the task's result
            while not forwarded() and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        executor.close()
    assert pid != os.getpid()
    assert forwarded() == ["curate.gradients"]
