"""
The ``store`` section (issue 21): the heartbeat ingest with PostgreSQL as the state
store against SQLite, explorer CPU per heartbeat side by side.  The goal: PostgreSQL
within 10% (<= 1.10x), since heartbeats of known nodes never wait on the database.

The server is a throw-away cluster on a Unix socket in a temporary directory (the
tests' :class:`tests.pgserver.PgServer`: Debian's ``postgresql``).
"""

from ingest import _ingest_one

#: PostgreSQL's explorer CPU per heartbeat may be at most this times SQLite's.
GOAL = 1.10


def sec_store(procs, tmp, res, cfg):
    """Ingest of ``store_n`` nodes over each store; the ratio beside it.

    10,000 nodes (1,000 heartbeats/s) by default: at 1,000 nodes (100/s) the explorer's
    fixed costs per second (timers, the store's watcher) weighed as much as the
    heartbeats, and two runs of the same commit differed by more than the goal's 10%.
    """
    from tests.pgserver import PgServer

    n = cfg["store_n"]
    server = PgServer()
    try:
        server.init()
        server.start()
        per_hb = {}
        for kind, database in (
            ("sqlite", None),
            ("postgresql", server.new_database()),
        ):
            _, _, _, _, extra = _ingest_one(
                procs,
                tmp,
                res,
                cfg,
                n,
                section="store",
                label=f", {kind}",
                targets=False,
                env_extra={"EXPLORER_DATABASE": database} if database else None,
            )
            per_hb[kind] = extra["cpu_per_hb_us"]
        row = res.rows[-1]
        if per_hb["sqlite"] and per_hb["postgresql"]:
            ratio = per_hb["postgresql"] / per_hb["sqlite"]
            res.goal(
                "store",
                f"{ratio:.2f}x ({per_hb['postgresql']} vs {per_hb['sqlite']} us per "
                f"heartbeat), N={n:,}",
                ratio <= GOAL,
                row=row,
            )
        else:
            res.goal("store", f"not measured: {per_hb}", None, row=row)
    finally:
        server.remove()
