"""Code written for the original SAGE communication API runs unchanged.

Written as a migrating user would write it: three services served from this
process (processing, storage, and a coordinator that calls both and
broadcasts an event it also subscribes to), managed by the ServiceManager,
listed, called directly, called through the coordinator, and called
concurrently from a thread pool. The forms are the original's:
``ServiceFunction(name=...)``, ``call_function(target_service=, function=,
payload=, timeout=)``, ``subscribe(topic)`` delivering to
``handle_message(message)``, ``initialize()``/``cleanup()`` called by the
user around ``start()``/``stop()``, ``FunctionClient(client_id)``, and the
original shapes of ``list_services()`` and ``list_functions()``.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
from _wait import wait_for

from sage_ray_comm import (
    BaseService,
    CommunicationPattern,
    FunctionClient,
    Message,
    ServiceFunction,
    get_communication_bus,
    get_service_manager,
)


class ProcessingService(BaseService):
    def __init__(self):
        super().__init__(service_name="processing")
        self.init_calls = 0
        self.cleanup_calls = 0

    def initialize(self):
        self.init_calls += 1

    def cleanup(self):
        self.cleanup_calls += 1

    @ServiceFunction(name="process_data")
    def process_data(self, payload):
        return {"processed": [x * 2 for x in payload["values"]], "by": self.service_id}


class StorageService(BaseService):
    def __init__(self):
        super().__init__(service_name="storage")
        self.data = {}
        self.lock = threading.Lock()

    @ServiceFunction(name="store")
    def store(self, payload):
        with self.lock:
            self.data[payload["key"]] = payload["value"]
        return {"stored": payload["key"]}

    @ServiceFunction(name="get")
    def get(self, payload):
        with self.lock:
            return self.data.get(payload["key"])


class CoordinatorService(BaseService):
    def __init__(self):
        super().__init__(service_name="coordinator")
        self.events = []
        self.got_event = threading.Event()

    def initialize(self):
        self.subscribe("pipeline.completed")  # no callback: events reach handle_message

    def handle_message(self, message):
        self.events.append((message.topic, message.payload))
        self.got_event.set()

    @ServiceFunction(name="run_pipeline")
    def run_pipeline(self, payload):
        processed = self.call_function(
            target_service="processing", function="process_data", payload={"values": payload["values"]}, timeout=10.0
        )
        stored = self.call_function(
            target_service="storage",
            function="store",
            payload={"key": payload["job"], "value": processed["processed"]},
            timeout=10.0,
        )
        reached = self.broadcast("pipeline.completed", {"job": payload["job"]})
        return {
            "job": payload["job"],
            "result": processed["processed"],
            "stored": stored["stored"],
            "subscribers": reached,
        }


@pytest.fixture
def services(bus):
    mgr = get_service_manager(bus)
    procs, store, coord = ProcessingService(), StorageService(), CoordinatorService()
    ids = []
    for svc in (procs, store, coord):
        ids.append(mgr.register_service(svc))  # the original returns the service id
        svc.initialize()  # original code initialises by hand after start
    assert ids == [procs.service_id, store.service_id, coord.service_id]
    yield procs, store, coord
    for svc in (procs, store, coord):
        svc.cleanup()  # ...and cleans up by hand before stop
    mgr.stop_all()


def test_migrating_user_code(bus, services):
    procs, store, coord = services
    client = FunctionClient("migrating-client", bus=bus)  # client_id positional, as in the original
    assert client.client_id == "migrating-client"

    listed = {s["service_name"]: s for s in client.list_services()}
    assert set(listed) == {"processing", "storage", "coordinator"}
    assert listed["processing"]["service_id"] == procs.service_id
    assert listed["processing"]["functions"] == ["process_data"]
    assert listed["storage"]["functions"] == ["get", "store"]
    assert set(listed["coordinator"]) == {"service_id", "service_name", "functions", "metadata"}
    assert listed["coordinator"]["metadata"]["replicas"] == 1
    funcs = client.list_functions()
    assert funcs["process_data"] == [procs.service_id]
    assert funcs["store"] == [store.service_id] and funcs["run_pipeline"] == [coord.service_id]

    # called directly, with the payload keyword
    assert client.call("processing", "process_data", payload={"values": [1, 2]})["processed"] == [2, 4]
    assert client.call("storage", "store", payload={"key": "k", "value": 1}) == {"stored": "k"}
    assert client.call("storage", "get", {"key": "k"}) == 1

    # through the coordinator, which calls both and broadcasts an event it receives itself
    out = client.call("coordinator", "run_pipeline", payload={"job": "j1", "values": [3, 4]})
    assert out == {"job": "j1", "result": [6, 8], "stored": "j1", "subscribers": 1}
    assert coord.got_event.wait(10)
    assert coord.events == [("pipeline.completed", {"job": "j1"})]
    assert client.call("storage", "get", payload={"key": "j1"}) == [6, 8]

    # concurrently from a thread pool
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = {
            i: pool.submit(client.call, "coordinator", "run_pipeline", payload={"job": f"c{i}", "values": [i, i + 1]})
            for i in range(40)
        }
        results = {i: f.result(timeout=60) for i, f in futs.items()}
    for i, r in results.items():
        assert r == {"job": f"c{i}", "result": [2 * i, 2 * i + 2], "stored": f"c{i}", "subscribers": 1}
    assert all(store.data[f"c{i}"] == [2 * i, 2 * i + 2] for i in range(40))

    # start() and the user's own initialize() ran it once; stop and cleanup likewise
    assert procs.init_calls == 1
    client.close()


def test_initialize_and_cleanup_once_per_cycle(bus):
    svc = ProcessingService()
    svc.initialize()  # user code first...
    svc.start(bus=bus)  # ...then start, which also initialises
    svc.initialize()
    assert svc.init_calls == 1
    svc.cleanup()
    svc.stop()  # stop's own cleanup() is the same cycle's
    svc.cleanup()
    assert svc.cleanup_calls == 1
    svc.start(bus=bus)  # a new cycle initialises again
    svc.stop()
    assert (svc.init_calls, svc.cleanup_calls) == (2, 2)


def test_subscribe_without_any_handler_counts_events(bus):
    class Silent(BaseService):
        def __init__(self):
            super().__init__("silent")

    svc = Silent().start(bus=bus)
    try:
        svc.subscribe("quiet.>")
        client = FunctionClient(bus=bus)
        client.wait_for_subscribers("quiet.x")
        assert client.broadcast("quiet.x", 1) == 1
        # handled in the service's dispatcher thread
        wait_for(lambda: svc.get_stats().get("events_unhandled", 0) >= 1, 10, "the event to be counted")
        assert svc.get_stats()["events_unhandled"] == 1
    finally:
        svc.stop()


def test_readme_route_message_example(bus):
    """The README's route_message line, as written: one payload is one argument."""
    import os

    from sage_ray_comm import sage_service, service_function

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    line = 'bus.route_message(Message(receiver="calculator", function="calculate", payload=42),'
    assert line in readme

    @sage_service(name="calculator")
    class Calculator(BaseService):
        @service_function
        def calculate(self, data: int, message=None) -> dict:
            return {"result": data * 2}

    b = get_communication_bus(bus)
    Calculator().start(bus=bus)
    assert b.route_message(
        Message(receiver="calculator", function="calculate", payload=42), CommunicationPattern.REQUEST_RESPONSE
    ) == {"result": 84}
