"""
The in-memory fakes provide the interfaces they stand in for.
"""

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from hero_compute.node.vms import IVmManager
from hero_compute.rpc.errors import InvalidVmState, VmNotFound
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.interfaces import IRpcClient

from .fakes import FakeRpcClient, MemoryVmManager
from .support import failure_result_of, success_result_of


def test_memory_vm_manager_provides_ivmmanager():
    """MemoryVmManager provides IVmManager."""
    assert verifyObject(IVmManager, MemoryVmManager(Clock()))


def test_fake_rpc_client_provides_irpcclient():
    """FakeRpcClient provides IRpcClient."""
    assert verifyObject(IRpcClient, FakeRpcClient())


def test_real_rpc_client_provides_irpcclient():
    """RpcClient provides IRpcClient, so the fake stands in for exactly what it does."""
    assert verifyObject(IRpcClient, RpcClient(Clock()))


def test_memory_vm_manager_lifecycle():
    """A VM is created stopped, counts in usage from then on (CONTRACT §9), runs, and is
    deleted."""
    vms = MemoryVmManager(Clock())
    vm = success_result_of(vms.create("a", 2, 256, 3))
    assert vm.state == "stopped"
    assert vms.usage() == {"vcpus": 2, "memory_mb": 256, "disk_gb": 3}
    failure_result_of(vms.stop(vm.vm_id), InvalidVmState)
    assert success_result_of(vms.start(vm.vm_id)).state == "running"
    assert vms.usage() == {"vcpus": 2, "memory_mb": 256, "disk_gb": 3}
    assert success_result_of(vms.delete(vm.vm_id)) is True
    failure_result_of(vms.get(vm.vm_id), VmNotFound)
