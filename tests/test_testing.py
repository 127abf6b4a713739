"""The shipped fakes: they keep up with what they stand in for, and a
client given a transport factory still reads the real registry."""

from __future__ import annotations

import inspect

from sage_ray_comm import BaseService, FunctionClient, sage_service, service_function
from sage_ray_comm._ray import RouterClient
from sage_ray_comm.testing import FakeRouter, FakeTransport
from sage_ray_comm.transport import Transport


def _public_methods(cls):
    return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def test_fake_router_has_the_router_client_methods_a_client_uses():
    missing = _public_methods(RouterClient) - {"register_queue", "unregister_queue"} - _public_methods(FakeRouter)
    assert not missing
    for name in _public_methods(RouterClient) & _public_methods(FakeRouter):
        real = list(inspect.signature(getattr(RouterClient, name)).parameters)
        fake = list(inspect.signature(getattr(FakeRouter, name)).parameters)
        assert real == fake, name


def test_fake_transport_implements_the_whole_interface():
    assert not getattr(FakeTransport, "__abstractmethods__", set())
    assert issubclass(FakeTransport, Transport)


@sage_service(name="real_echo", replicas=1, num_cpus=0.1)
class RealEcho(BaseService):
    @service_function
    def echo(self, x):
        return ("real", x)


def test_a_transport_factory_on_the_real_registry(bus):
    handle = RealEcho.deploy(bus=bus)
    fake = FakeTransport(handler=lambda inst, req: ("fake", inst.instance_id, req.args))
    nodes = []

    def factory(node_id):
        nodes.append(node_id)
        return fake

    with FunctionClient(bus=bus, transport=factory) as c:
        iid = handle.instances[0].instance_id
        assert c.call("real_echo", "echo", 1) == ("fake", iid, (1,))
        assert nodes[-1] == handle.instances[0].node_id  # asked for the replica's node
    with FunctionClient(bus=bus) as real:  # the shared endpoint is untouched
        assert real.call("real_echo", "echo", 2) == ("real", 2)


def test_the_readme_example_runs_without_ray():
    import ray

    from sage_ray_comm.testing import FakeRouter as FR
    from sage_ray_comm.testing import FakeTransport as FT

    fake = FT(handler=lambda inst, req: sum(req.args))
    router = FR("b").add_replica("calculator", "calc-1", functions=["add"])
    client = FunctionClient(bus="b", transport=lambda node_id: fake, router=router)
    was_up = ray.is_initialized()
    assert client.call("calculator", "add", 1, 2) == 3
    assert fake.calls[0][0] == "calc-1"
    assert ray.is_initialized() == was_up, "a client on a FakeRouter never starts Ray"
    fake.dead.add("calc-1")
    import pytest

    from sage_ray_comm import ServiceUnavailable

    with pytest.raises(ServiceUnavailable):
        client.call("calculator", "add", 1, 2)
    client.close()
