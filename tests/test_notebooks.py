"""The notebooks run top to bottom in a real Jupyter kernel, and fail on any error."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.slow
def test_pipeline_prototyping_notebook(tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOKS, "pipeline_prototyping.ipynb"), as_version=4)
    # Its own kernel process, hence its own embedded Ray, as for a user.
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for outs in outputs.values() for o in outs
    )
    assert "'version': 2" in text and "p50" in text and "done, nothing left behind" in text
    assert "summary: Summary(room='kitchen', fahrenheit=70.7)" in text  # classes defined in the notebook
    assert any("image/png" in o.get("data", {}) for outs in outputs.values() for o in outs), "the latency plot"


KERNEL_LEAVES_OPEN = """
import ray
from sage_ray_comm import BaseService, FunctionClient, create_queue_adapter, get_communication_bus, sage_service, service_function
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

@sage_service(name="echo", num_cpus=0.1)
class Echo(BaseService):
    @service_function
    def echo(self, x):
        return x

Echo.deploy(bus=BUS)
client = FunctionClient(bus=BUS)
assert client.call("echo", "echo", 5) == 5
get_communication_bus(BUS).subscribe("t.>", print)
q = create_queue_adapter("old", bus=BUS); q.put(1)
print("left open")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kernel_restart_leaves_nothing_behind(tmp_path):
    """A user restarts the kernel with a service, a subscription and an adapter
    still open. Jupyter kills a kernel that has not exited 5 s after the
    request, and a kernel running Ray takes longer than that (Ray's shutdown),
    so no exit hook runs. The next bus started on the node removes what the
    killed kernel left; its legacy queue stays, items and all, until its bus
    is shut down, as legacy queues do."""
    import time
    import uuid

    from jupyter_core.utils import run_sync
    from nbformat.v4 import new_code_cell, new_notebook

    from sage_ray_comm import shm
    from sage_ray_comm.ray_transport import JANITOR_GRACE
    from sage_ray_comm.router import bus_namespace

    bus = f"kernel-{uuid.uuid4().hex[:6]}"
    cells = [
        new_code_cell(f"BUS = {bus!r}\n" + KERNEL_LEAVES_OPEN),
        new_code_cell(
            "import ray\nray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
            "from sage_ray_comm import get_communication_bus\n"
            "get_communication_bus('after-restart').start()\nprint('another bus started')"
        ),
        new_code_cell(f"get_communication_bus({bus!r}).shutdown(); print('old bus shut down')"),
    ]
    nb = new_notebook(cells=cells)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        assert "left open" in "".join(o.get("text", "") for o in nb.cells[0].outputs)
        assert len(shm.list_segments(bus_namespace(bus))) >= 3, "requests, replies, events, the legacy queue"
        old = client.km.provisioner.process  # the kernel's Popen
        run_sync(client.km.restart_kernel)(now=False)  # as the Restart button does
        assert old.poll() is not None
        # The other bus's start sweeps segments left unwritten for the grace period.
        newest = min(s.idle_seconds for s in shm.list_segments(bus_namespace(bus)))
        time.sleep(max(0.0, JANITOR_GRACE - newest + 0.5))  # age the killed kernel's segments past the grace
        client.execute_cell(nb.cells[1], 1)
        left = shm.list_segments(bus_namespace(bus))
        assert [s.legacy for s in left] == [True], [s.shm_name for s in left]
        client.execute_cell(nb.cells[2], 2)
        left = shm.list_segments(bus_namespace(bus))
    for s in left:
        os.unlink(shm.SHM_DIR + s.shm_name)
    assert not left, [s.shm_name for s in left]
