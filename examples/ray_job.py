"""A Ray job: submit it to a running cluster, it deploys, calls and exits.

    ray start --head
    ray job submit --working-dir examples -- python ray_job.py
    python examples/ray_job.py          # or as a plain script (starts a local Ray)

``dictionary`` is detached (``lifetime="detached"``): it stays up for later
jobs on the same bus. ``tokenizer`` belongs to this job and ends with it.
Nothing needs closing: the job ends SUCCEEDED with what it printed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function


@dataclasses.dataclass
class Tokens:  # defined in the job's script (__main__): travels by value, as Ray does
    words: list
    known: int


@sage_service(name="dictionary", num_cpus=0.1, lifetime="detached")
class Dictionary(BaseService):
    WORDS: ClassVar[set[str]] = {"ray", "actor", "shared", "memory", "ring", "service"}

    @service_function
    def known(self, words: list) -> int:
        return sum(w in self.WORDS for w in words)


@sage_service(name="tokenizer", replicas=2, num_cpus=0.1)
class Tokenizer(BaseService):
    @service_function
    def tokenize(self, text: str) -> Tokens:
        words = text.lower().split()
        return Tokens(words, self.call_service["dictionary"].known(words))


def main() -> None:
    bus = get_communication_bus("jobs-demo").start()  # attaches to the cluster (starts a local Ray if none)
    Dictionary.deploy(bus=bus.name)  # identical code already running: kept
    Tokenizer.deploy(bus=bus.name)
    client = FunctionClient(bus=bus.name)
    for text in ["Ray actor calls", "a shared memory ring per service"]:
        t = client.call("tokenizer", "tokenize", text)
        print(f"{text!r}: {len(t.words)} words, {t.known} known ({type(t).__name__})")
    print("services:", ", ".join(s["service_name"] for s in client.list_services()))
    print("calls over shared memory:", client.stats()["shm"])


if __name__ == "__main__":
    main()
