"""A driver on a 12 MiB /dev/shm (run by tests/test_small_shm.py in its own
mount namespace): room for one 8 MiB ring and no more.

Prints one RESULT line of JSON: what worked, over which transport, and the
typed error an in-process service got.
"""

from __future__ import annotations

import json
import logging
import sys

import ray

from sage_ray_comm import BaseService, FunctionClient, SharedMemoryFull, sage_service, service_function, shm

bus = sys.argv[1]
logging.basicConfig(level=logging.WARNING)
ray.init(
    num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=80 << 20
)


@sage_service(name="echo", replicas=2, num_cpus=0.1)
class Echo(BaseService):
    @service_function
    def echo(self, x):
        return x

    @service_function
    async def aecho(self, x):
        return x


class Local(BaseService):
    @service_function
    def f(self):
        return 1


h = Echo.deploy(bus=bus)
c = FunctionClient(bus=bus)
results = [c.call("echo", "echo", i) for i in range(20)]
fut = c.call_async("echo", "aecho", "async")
big = c.call("echo", "echo", b"x" * (6 << 20))  # larger than what is left in /dev/shm
try:
    Local("local").start(bus=bus)
    local_error = None
except SharedMemoryFull as e:
    local_error = str(e)
out = {
    "total_mib": shm.shm_space()[0] >> 20,
    "results_ok": results == list(range(20)),
    "async": fut.result(timeout=30),
    "big_ok": big == b"x" * (6 << 20),
    "ringless_replicas": sum(1 for i in h.instances if not i.request_queue),
    "stats": {k: c.stats()[k] for k in ("shm", "ray", "errors")},
    "local_error": local_error,
}
print("RESULT " + json.dumps(out), flush=True)
