"""A script whose argument classes live in ``__main__``, as users write them.

    python _main_classes_driver.py BUS

Passes a pydantic model, a dataclass, a lambda and a closure to a deployed
service (also defined here) and back; prints one RESULT line of JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import ray
from pydantic import BaseModel

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function


class Point(BaseModel):
    x: float
    y: float


@dataclasses.dataclass
class Box:
    w: int
    h: int


@sage_service(name="geo", replicas=1, num_cpus=0.1)
class Geo(BaseService):
    @service_function
    def scale(self, p: Point, k: float) -> Point:
        return Point(x=p.x * k, y=p.y * k)

    @service_function
    def grow(self, b):
        return Box(b.w + 1, b.h + 1)

    @service_function
    def apply(self, fn, x):
        return fn(x)

    @service_function
    def make_adder(self, n):
        return lambda v: v + n  # a closure goes back too


def main(bus: str) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    Geo.deploy(bus=bus)
    c = FunctionClient(bus=bus)
    p = c.call("geo", "scale", Point(x=3, y=4), 2)
    b = c.call("geo", "grow", Box(1, 2))
    offset = 10
    closure = c.call("geo", "apply", lambda v: v + offset, 5)
    adder = c.call("geo", "make_adder", 7)
    out = {
        "point": [type(p).__name__, type(p) is Point, p.x, p.y],
        "box": [type(b) is Box, b.w, b.h],
        "closure": closure,
        "adder": adder(1),
        "transport": c.stats()["shm"],
    }
    get_communication_bus(bus).shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
