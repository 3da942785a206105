"""
``twistd explorer``: options and the service tree.

Every option may also come from the environment (CONTRACT §2); the command line wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.python import usage

from hero_compute.options import (
    TapOptions,
    absolute_path,
    absolute_socket,
    coerce_doc,
    from_env,
    help_text,
    limit_help,
    limits,
    listen_address,
    print_startup_errors,
    seconds,
    socket_dir,
    source_of,
    state_dir,
)
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.systemd import notifier_for
from hero_compute.rpc.twisted_private import lean_poll

if TYPE_CHECKING:
    from .tree import ExplorerService

#: Seconds of silence before a node is offline, unless the operator says otherwise
#: (``NODE_OFFLINE_AFTER``, CONTRACT §2).
OFFLINE_AFTER = 30.0

#: Where the explorer keeps its state (``EXPLORER_STATE_DIR``, CONTRACT §6).
STATE_DIR = "~/hero/var/hero_compute_explorer"

#: Life of the certificates the explorer signs for nodes (they renew at two thirds).
NODE_CERT_TTL = 90 * 86400.0


def _database(value):
    """``EXPLORER_DATABASE``: a ``postgresql://`` URI as given, or an absolute path."""
    from .store import is_postgres

    return value if is_postgres(value) else absolute_path(value)


coerce_doc(_database, "An absolute path, or a postgresql:// URI.")


class Options(TapOptions):
    """Options of ``twistd explorer``."""

    command = "explorer"

    synopsis = (
        "[--socket PATH] [--tcp HOST:PORT] [--tls HOST:PORT] [--listen ENDPOINT]... "
        "[--offline-after S] [--state-dir DIR] [--metrics HOST:PORT] "
        "[--ui HOST:PORT]"
    )
    longdesc = (
        "The hero_compute explorer: the registry of nodes and a proxy to them. "
        "It listens on its Unix socket (with --listen systemd:..., socket-activated, only "
        "on the sockets systemd passed, and on --socket or EXPLORER_SOCKET if given); "
        "--tcp, --tls and --listen add listeners. Run two twistd in one "
        "directory with --pidfile= (or distinct --pidfile), or they clash on twistd.pid. "
        "Environment: HERO_SOCKET_DIR, EXPLORER_SOCKET, EXPLORER_TCP_ADDR, "
        "EXPLORER_TLS_ADDR, EXPLORER_TLS_CERT, EXPLORER_TLS_KEY, EXPLORER_TLS_CA, "
        "EXPLORER_CA_KEY, EXPLORER_STATE_DIR, NODE_OFFLINE_AFTER, EXPLORER_METRICS_ADDR, "
        "EXPLORER_UI_ADDR, EXPLORER_UI_TOKEN_FILE, EXPLORER_UI_TLS, EXPLORER_UI_HOSTS, "
        "EXPLORER_DATABASE."
    )
    optParameters = [
        [
            "socket",
            None,
            None,
            "Unix socket [default: $EXPLORER_SOCKET or "
            "$HERO_SOCKET_DIR/hero_compute_explorer.sock]",
            absolute_socket,
        ],
        [
            "tcp",
            None,
            None,
            "Also listen on TCP here [default: $EXPLORER_TCP_ADDR; unset: no TCP]",
            listen_address,
        ],
        [
            "tls",
            None,
            None,
            "Also serve mutual TLS here [default: $EXPLORER_TLS_ADDR; unset: no TLS]",
            listen_address,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (GET /metrics) here "
            "[default: $EXPLORER_METRICS_ADDR; unset: no metrics]",
            listen_address,
        ],
        [
            "ui",
            None,
            None,
            "Serve the read-only dashboard here; its URL and the file holding its token "
            "(STATE_DIR/ui-token, 0600) are logged at start "
            "[default: $EXPLORER_UI_ADDR; unset: no dashboard]",
            listen_address,
        ],
        [
            "ui-hosts",
            None,
            None,
            "Comma-separated Host names the dashboard answers for (anything else: 421) "
            "[default: $EXPLORER_UI_HOSTS or the --ui host, localhost, 127.0.0.1, "
            "[::1]; IP literals of its listener always]",
            str,
        ],
        [
            "ui-token-file",
            None,
            None,
            "Read the dashboard's token from this file instead of making a random one "
            "[default: $EXPLORER_UI_TOKEN_FILE]",
            absolute_path,
        ],
        [
            "offline-after",
            None,
            None,
            "Seconds without a heartbeat before a node is offline "
            "[default: $NODE_OFFLINE_AFTER or 30]",
            seconds,
        ],
        [
            "state-dir",
            None,
            None,
            "Where the explorer keeps its state (explorer.db, tls/) "
            "[default: $EXPLORER_STATE_DIR or ~/hero/var/hero_compute_explorer]",
            absolute_path,
        ],
        [
            "database",
            None,
            None,
            "The state store: an SQLite file, or a postgresql:// URI shared with other "
            "explorers [default: $EXPLORER_DATABASE or STATE_DIR/explorer.db]",
            _database,
        ],
        [
            "tls-cert",
            None,
            None,
            "Our certificate [default: $EXPLORER_TLS_CERT or STATE_DIR/tls/explorer.pem]",
            absolute_path,
        ],
        [
            "tls-key",
            None,
            None,
            "Its key [default: $EXPLORER_TLS_KEY or STATE_DIR/tls/explorer-key.pem]",
            absolute_path,
        ],
        [
            "tls-ca",
            None,
            None,
            "The fleet CA [default: $EXPLORER_TLS_CA or STATE_DIR/tls/ca.pem]",
            absolute_path,
        ],
        [
            "ca-key",
            None,
            None,
            "The fleet CA's key: sign enrollments and renewals [default: $EXPLORER_CA_KEY; "
            "unset: no signing]",
            absolute_path,
        ],
        [
            "node-cert-ttl",
            None,
            None,
            "Seconds of life of the node certificates it signs "
            "[default: $EXPLORER_NODE_CERT_TTL or 90 days]",
            seconds,
        ],
    ]

    optFlags = [
        [
            "ui-tls",
            None,
            "Serve the dashboard over mutual TLS with the explorer's material; a client "
            "certificate then stands in for the token [default: $EXPLORER_UI_TLS]",
        ],
    ]

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        TapOptions.__init__(self)
        self["listen"] = []
        self["limit"] = []
        self._env = os.environ if env is None else env

    @help_text
    def opt_listen(self, description: str) -> None:
        """
        Also listen on this Twisted server endpoint (unix:..., tcp:..., ssl:...,
        systemd:...); may repeat.  A unix: socket is mode 0660 (mode= may only narrow it).
        """
        self["listen"].append(description)

    @limit_help("HERO_", "EXPLORER_", "NODE_FORGET_AFTER")
    def opt_limit(self, item: str) -> None:
        """
        Set one limit of hostile load, NAME=VALUE (e.g. max_batch=50, or by its
        variable: HERO_MAX_BATCH=50); may repeat [default: the HERO_* and EXPLORER_*
        variables and NODE_FORGET_AFTER, else {defaults}].
        """
        self["limit"].append(item)

    def postOptions(self) -> None:
        env = self._env
        self["limits"] = limits(self, env)
        sources = self["sources"] = {
            "socket": source_of(self, "socket", env, "EXPLORER_SOCKET"),
            "tcp": source_of(self, "tcp", env, "EXPLORER_TCP_ADDR"),
            "tls": source_of(self, "tls", env, "EXPLORER_TLS_ADDR"),
            "metrics": source_of(self, "metrics", env, "EXPLORER_METRICS_ADDR"),
            "ui": source_of(self, "ui", env, "EXPLORER_UI_ADDR"),
            "state-dir": source_of(self, "state-dir", env, "EXPLORER_STATE_DIR"),
        }
        explicit_socket = self["socket"] is not None or bool(env.get("EXPLORER_SOCKET"))
        from_env(self, "socket", env, "EXPLORER_SOCKET", absolute_socket)
        if self["socket"] is None:
            sources["socket"] = "HERO_SOCKET_DIR"
            self["socket"] = os.path.join(socket_dir(env), "hero_compute_explorer.sock")
        # Socket-activated (--listen systemd:...), the explorer serves what systemd
        # passed it, and its own socket only when asked to: binding the default path as
        # well would replace the socket unit's.  (Not LISTEN_FDS: Twisted consumes it as
        # it loads its endpoints, before options are parsed.)
        self["bind-socket"] = explicit_socket or not any(
            d.startswith("systemd:") for d in self["listen"]
        )
        self["notify-env"] = {
            k: env[k]
            for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
            if k in env
        }
        from_env(self, "tcp", env, "EXPLORER_TCP_ADDR", listen_address)
        from_env(self, "tls", env, "EXPLORER_TLS_ADDR", listen_address)
        from_env(self, "metrics", env, "EXPLORER_METRICS_ADDR", listen_address)
        from_env(self, "ui", env, "EXPLORER_UI_ADDR", listen_address)
        from_env(self, "ui-token-file", env, "EXPLORER_UI_TOKEN_FILE", absolute_path)
        if env.get("EXPLORER_UI_TLS", "").lower() in ("1", "true", "yes"):
            self["ui-tls"] = True
        from_env(self, "ui-hosts", env, "EXPLORER_UI_HOSTS", str)
        if self["ui-hosts"] is not None:
            self["ui-hosts"] = [h.strip() for h in self["ui-hosts"].split(",") if h.strip()]
        elif self["ui"] is not None:
            from .dashboard_guard import DEFAULT_HOSTS

            self["ui-hosts"] = [self["ui"].host, *DEFAULT_HOSTS]
        self["ui-token"] = None
        if self["ui"] is not None and self["ui-token-file"] is not None:
            from .dashboard import read_token_file

            try:
                self["ui-token"] = read_token_file(self["ui-token-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from e
        from_env(self, "offline-after", env, "NODE_OFFLINE_AFTER", seconds)
        if self["offline-after"] is None:
            self["offline-after"] = OFFLINE_AFTER
        if self["state-dir"] is None:
            self["state-dir"] = state_dir(env, "EXPLORER_STATE_DIR", STATE_DIR)
        from_env(self, "database", env, "EXPLORER_DATABASE", _database)
        if self["database"] is None:
            self["database"] = os.path.join(self["state-dir"], "explorer.db")
        tls_dir = os.path.join(self["state-dir"], "tls")
        for key, name, default in (
            ("tls-cert", "EXPLORER_TLS_CERT", "explorer.pem"),
            ("tls-key", "EXPLORER_TLS_KEY", "explorer-key.pem"),
            ("tls-ca", "EXPLORER_TLS_CA", "ca.pem"),
        ):
            from_env(self, key, env, name, absolute_path)
            if self[key] is None:
                self[key] = os.path.join(tls_dir, default)
        from_env(self, "ca-key", env, "EXPLORER_CA_KEY", absolute_path)
        from_env(self, "node-cert-ttl", env, "EXPLORER_NODE_CERT_TTL", seconds)
        if self["node-cert-ttl"] is None:
            self["node-cert-ttl"] = NODE_CERT_TTL
        if self.under_twistd:
            self._clean_startup_errors()

    def _clean_startup_errors(self) -> None:
        import sqlite3

        from hero_compute.rpc.listeners import StartupFailed
        from hero_compute.rpc.tls import TLSConfigError

        from .state import StartupError
        from .store import StoreError

        database = self["database"]
        print_startup_errors(
            "explorer",
            (
                StartupFailed,
                StartupError,
                StoreError,
                TLSConfigError,
                (
                    sqlite3.Error,
                    f"cannot open the explorer state {database}: {{error}} "
                    f"({self['sources']['state-dir']})",
                ),
            ),
            [
                (os.path.dirname(self["socket"]), self["sources"]["socket"]),
                (self["state-dir"], self["sources"]["state-dir"]),
            ],
        )


def makeService(options: Options, reactor: Any = None) -> ExplorerService:
    """
    Wire the explorer from its options; nothing is opened until it starts.

    :param options: parsed :class:`Options`
    :param reactor: the reactor (and clock), the global one by default
    :return: the root service, built by :func:`~hero_compute.explorer.tree.make_explorer`
    """
    if reactor is None:
        from twisted.internet import reactor

    # Its own process: every read without the legacy log context around it.
    lean_poll(reactor)

    from .tls_material import TLSSettings
    from .tree import make_explorer

    sources = options["sources"]
    listen: list[Listen] = []
    if options["bind-socket"]:
        listen.append(Listen.unix(options["socket"], sources["socket"]))
    if options["tcp"] is not None:
        listen.append(Listen.tcp(options["tcp"], sources["tcp"]))
    listen.extend(Listen.endpoint(d) for d in options["listen"])
    explorer = make_explorer(
        reactor=reactor,
        clock=reactor,
        listen=listen,
        socket_dirs=[os.path.dirname(options["socket"])] if options["bind-socket"] else [],
        offline_after=options["offline-after"],
        state_dir=options["state-dir"],
        database=options["database"],
        tls=TLSSettings(
            listen=None
            if options["tls"] is None
            else Listen.tls(options["tls"], sources["tls"]),
            cert=options["tls-cert"],
            key=options["tls-key"],
            ca=options["tls-ca"],
            ca_key=options["ca-key"],
        ),
        node_cert_days=options["node-cert-ttl"] / 86400,
        limits=options["limits"],
        metrics=None
        if options["metrics"] is None
        else Listen.tcp(options["metrics"], sources["metrics"]),
        ui=None if options["ui"] is None else Listen.tcp(options["ui"], sources["ui"]),
        ui_token=options["ui-token"],
        ui_token_file=options["ui-token-file"],
        ui_tls=bool(options["ui-tls"]),
        ui_hosts=options["ui-hosts"],
        # Its own process: the heap left by start-up (the fleet as last known) is
        # frozen, so the cycle collector does not stop the reactor to walk it.
        freeze_heap=True,
    )
    if options["notify-env"].get("NOTIFY_SOCKET"):
        # Only under a service manager (Type=notify), so the tree is otherwise the same.
        notifier_for(reactor, options["notify-env"], explorer.listeners).setServiceParent(
            explorer
        )
    return explorer
