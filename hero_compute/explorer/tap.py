"""
``twistd explorer``: options and the service tree.

Every option may also come from the environment (CONTRACT §2); the command line wins.
"""

import os

from twisted.python import usage

from hero_compute.options import (
    absolute_socket,
    from_env,
    help_text,
    listen_address,
    seconds,
    socket_dir,
)
from hero_compute.rpc.listeners import unix_endpoint_string

#: Seconds of silence before a node is offline, unless the operator says otherwise
#: (``NODE_OFFLINE_AFTER``, CONTRACT §2).
OFFLINE_AFTER = 30.0


class Options(usage.Options):
    """Options of ``twistd explorer``."""

    synopsis = "[--socket PATH] [--tcp HOST:PORT] [--listen ENDPOINT]... [--offline-after S]"
    longdesc = (
        "The hero_compute explorer: the registry of nodes and a proxy to them. "
        "It always listens on its Unix socket; --tcp and --listen add listeners. "
        "Environment: HERO_SOCKET_DIR, EXPLORER_SOCKET, EXPLORER_TCP_ADDR, "
        "NODE_OFFLINE_AFTER."
    )
    optParameters = [
        ["socket", None, None,
         "Unix socket [default: $EXPLORER_SOCKET or "
         "$HERO_SOCKET_DIR/hero_compute_explorer.sock]", absolute_socket],
        ["tcp", None, None,
         "Also listen on TCP here [default: $EXPLORER_TCP_ADDR; unset: no TCP]",
         listen_address],
        ["offline-after", None, None,
         "Seconds without a heartbeat before a node is offline "
         "[default: $NODE_OFFLINE_AFTER or 30]", seconds],
    ]

    def __init__(self, env=None):
        usage.Options.__init__(self)
        self["listen"] = []
        self._env = os.environ if env is None else env

    @help_text
    def opt_listen(self, description):
        """
        Also listen on this Twisted server endpoint (unix:..., tcp:..., ssl:...,
        systemd:...); may repeat.
        """
        self["listen"].append(description)

    def postOptions(self):
        env = self._env
        from_env(self, "socket", env, "EXPLORER_SOCKET", absolute_socket)
        if self["socket"] is None:
            self["socket"] = os.path.join(socket_dir(env), "hero_compute_explorer.sock")
        from_env(self, "tcp", env, "EXPLORER_TCP_ADDR", listen_address)
        from_env(self, "offline-after", env, "NODE_OFFLINE_AFTER", seconds)
        if self["offline-after"] is None:
            self["offline-after"] = OFFLINE_AFTER


def makeService(options, reactor=None):
    """
    Wire the explorer from its options; nothing is opened until it starts.

    :param options: parsed :class:`Options`
    :param reactor: the reactor (and clock), the global one by default
    :return: the root service, built by :func:`~hero_compute.explorer.service.make_explorer`
    """
    if reactor is None:
        from twisted.internet import reactor

    from .service import make_explorer

    listen = [unix_endpoint_string(options["socket"])]
    if options["tcp"] is not None:
        listen.append(options["tcp"].endpoint_string())
    listen.extend(options["listen"])
    return make_explorer(
        reactor=reactor,
        clock=reactor,
        listen=listen,
        socket_dirs=[os.path.dirname(options["socket"])],
        offline_after=options["offline-after"],
    )
