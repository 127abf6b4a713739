"""Several worker processes share one SageQueue by name (MPMC).

    python examples/queue_workers.py

A producer puts jobs; three workers, each opening the queue by its name in
the job's namespace, take them; results come back on a second queue. A
second namespace holds a queue of the same name that nobody else sees.
"""

import multiprocessing as mp
import os
import time

from sage_ray_comm import QueueClosed, SageQueue


def worker(namespace: str, worker_id: int) -> None:
    jobs = SageQueue("jobs", namespace=namespace, create=False)
    results = SageQueue("results", namespace=namespace, create=False)
    while True:
        try:
            job = jobs.get(timeout=30)
        except QueueClosed:  # closed and drained: no more work
            return
        time.sleep(0.001)  # stands for real work, so the jobs spread over the workers
        results.put({"job": job["id"], "square": job["x"] ** 2, "worker": worker_id})


def main() -> int:
    NAMESPACE = f"example-{os.getpid()}"  # one job's namespace: nothing outside it sees these queues
    ctx = mp.get_context("spawn")
    with (
        SageQueue("jobs", namespace=NAMESPACE) as jobs,
        SageQueue("results", namespace=NAMESPACE) as results,
        SageQueue("jobs", namespace=NAMESPACE + "-other") as other,
    ):
        workers = [ctx.Process(target=worker, args=(NAMESPACE, i)) for i in range(3)]
        for w in workers:
            w.start()
        n = 300
        t0 = time.perf_counter()
        jobs.put_many({"id": i, "x": i} for i in range(n))
        out = [results.get(timeout=60) for _ in range(n)]
        dt = time.perf_counter() - t0
        jobs.close()  # workers drain and exit
        for w in workers:
            w.join(30)
        assert sorted(r["job"] for r in out) == list(range(n))
        assert all(r["square"] == r["job"] ** 2 for r in out)
        per_worker = {i: sum(1 for r in out if r["worker"] == i) for i in range(3)}
        print(f"{n} jobs done by 3 workers in {dt * 1e3:.0f} ms; jobs per worker: {per_worker}")
        print(f"same name in another namespace saw {other.qsize()} jobs")
        return 0 if other.qsize() == 0 and all(w.exitcode == 0 for w in workers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
