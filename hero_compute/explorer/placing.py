"""
``explorer.place`` and ``explorer.create_vm`` (CONTRACT §9): the RPC side of
:mod:`.placement`, which holds the index and the scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from hero_compute.rpc.errors import InvalidVmState, NoNodeFits, RpcError

from .placement import NoFit, Request

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from hero_compute.rpc.dispatch import Dispatcher

    from .registry import Registry


log = Logger()

#: ``explorer.create_vm`` tries at most this many candidates in all.
CANDIDATES = 3


class PlacementMethods:
    """
    Place VMs on the fleet, and create them there.

    :param registry: the :class:`~.registry.Registry` (its ``placement`` index)
    :param call: ``call(node_id, method, params)`` returning a Deferred: the proxy
        ``explorer.call`` uses
    :param clock: an ``IReactorTime``
    """

    def __init__(
        self,
        registry: Registry,
        call: Callable[[str, str, Any], Deferred[Any]],
        clock: IReactorTime,
    ) -> None:
        self._registry = registry
        self._index = registry.placement
        self._call = call
        self._clock = clock

    def register(self, rpc: Dispatcher) -> None:
        """Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`."""
        rpc.register("explorer.place", self.place)
        rpc.register("explorer.create_vm", self.create_vm)

    def _choose(self, request):
        try:
            return self._index.place(request, self._clock.seconds())
        except NoFit as e:
            raise NoNodeFits("no node fits", data=e.counts) from None

    def place(
        self,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        where: dict | None = None,
        strategy: str | None = None,
        avoid: list | None = None,
    ) -> dict:
        """
        The node a VM of this size would go to now; reserves nothing.

        :return: ``{"node_id", "name"}``
        :raise NoNodeFits: -32006, ``data`` counting the nodes set aside by reason
        """
        node_id = self._choose(
            Request.of(vcpus, memory_mb, disk_gb, where, avoid or (), strategy)
        )
        return {"node_id": node_id, "name": self._registry.get(node_id).name}

    async def create_vm(
        self,
        name: str,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        image: str | None = None,
        ssh_keys: list | None = None,
        user_data: str | None = None,
        hostname: str | None = None,
        network: str | None = None,
        ports: list | None = None,
        boot: dict | None = None,
        where: dict | None = None,
        strategy: str | None = None,
    ) -> dict:
        """
        Place a VM and define it on the chosen node; a node answering -32005 (no room
        after all, a taken name, a forward's host port in use) is set aside for the next
        candidate, three in all.  ``image`` to ``boot`` go to ``vm.create`` as given.

        :return: the node's VmInfo with ``node_id``
        :raise NoNodeFits: no candidate fits and none refused
        :raise InvalidVmState: the last -32005, when the third candidate refused or
            none is left after a refusal
        """
        params: dict = {
            "name": name,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "disk_gb": disk_gb,
        }
        for key, value in (
            ("image", image),
            ("ssh_keys", ssh_keys),
            ("user_data", user_data),
            ("hostname", hostname),
            ("network", network),
            ("ports", ports),
            ("boot", boot),
        ):
            if value is not None:
                params[key] = value
        amounts = (vcpus, memory_mb, disk_gb)
        avoid: set[str] = set()
        refused: RpcError | None = None
        for _ in range(CANDIDATES):
            try:
                node_id = self._choose(
                    Request.of(vcpus, memory_mb, disk_gb, where, avoid, strategy)
                )
            except NoNodeFits:
                # The refusals set aside every candidate: the caller must learn why
                # (a host port in use, a taken name), not "no node fits".
                if refused is not None:
                    raise refused from None
                raise
            reservation = self._index.reserve(node_id, amounts, self._clock.seconds())
            try:
                vm = await self._call(node_id, "vm.create", params)
            except InvalidVmState as e:
                self._index.release(reservation)
                log.info(
                    "create_vm {name}: node {node_id} refused it ({error}); next candidate",
                    name=name,
                    node_id=node_id,
                    error=e,
                )
                avoid.add(node_id)
                refused = e
                continue
            except BaseException:
                self._index.release(reservation)
                raise
            self._index.created(reservation)
            return {**vm, "node_id": node_id}
        assert refused is not None
        raise refused
