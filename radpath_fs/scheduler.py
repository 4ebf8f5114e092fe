"""Run one pure task per item (a slide, a case) under any Dask scheduler, with a progress bar.

`--scheduler` takes: ``sync`` (one process, no Dask), ``threads``, ``processes`` (Dask's local
schedulers), ``local:N`` (a distributed LocalCluster of N worker processes), ``cuda`` (dask-cuda,
one worker per GPU) or ``tcp://host:port`` (an existing cluster). Tasks get explicit inputs (store
URL, case id, config) and return small results; each writes only its own output group, so the
scheduler changes nothing in the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from radpath_fs.errors import RadpathError
from radpath_fs.progress import progress_bar

SCHEDULERS = "sync, threads, processes, local:N, cuda, tcp://host:port"


def check_scheduler(spec: str) -> str:
    ok = spec in ("sync", "threads", "processes", "cuda") or spec.startswith(("tcp://", "tls://"))
    if spec.startswith("local:"):
        n = spec.split(":", 1)[1]
        ok = n.isdigit() and int(n) >= 1
    if not ok:
        raise RadpathError(f"--scheduler {spec!r}: expected one of {SCHEDULERS}")
    return spec


@contextlib.contextmanager
def _client(spec: str) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if spec.startswith("local:"):
        # Workers are processes with one thread each: torch and libvips bring their own threads.
        with LocalCluster(
            n_workers=int(spec.split(":", 1)[1]),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster, Client(cluster) as client:
            yield client
    elif spec == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise RadpathError("--scheduler cuda needs dask-cuda: pip install 'radpath_fs[gpu]'") from None
        with LocalCUDACluster(dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
    else:
        with Client(spec) as client:
            yield client


def map_tasks(
    fn: Callable[..., Any],
    items: Sequence[Any],
    *,
    scheduler: str = "sync",
    description: str = "tasks",
    **kwargs: Any,
) -> list[Any]:
    """`[fn(item, **kwargs) for item in items]` under `scheduler`, in order, with a progress bar."""
    check_scheduler(scheduler)
    if not items:
        return []
    with progress_bar(description, total=len(items)) as advance:
        if scheduler == "sync":
            results = []
            for item in items:
                results.append(fn(item, **kwargs))
                advance()
            return results
        if scheduler in ("threads", "processes"):
            import dask
            from dask.callbacks import Callback

            class _Advance(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    advance()

            tasks = [dask.delayed(fn, pure=True)(item, **kwargs) for item in items]
            with _Advance():
                return list(dask.compute(*tasks, scheduler=scheduler))
        from distributed import as_completed

        with _client(scheduler) as client:
            futures = [client.submit(fn, item, pure=False, **kwargs) for item in items]
            for _ in as_completed(futures):
                advance()
            return client.gather(futures)
