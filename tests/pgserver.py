"""
A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a cluster made
with ``initdb`` in a temporary directory, listening on a Unix socket only
(``listen_addresses=''``), started and stopped with ``pg_ctl``.  PostgreSQL refuses to
run as root: under root the commands run as the ``postgres`` user (``runuser``).
"""

import glob
import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.parse


def binaries():
    """:return: the newest installed PostgreSQL ``bin`` directory, or None"""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
    )
    return found[-1] if found else None


class PgServer:
    """
    One throw-away cluster.  The superuser ``postgres`` has a random password
    (``password``), so the tests can look for it in logs; :meth:`dsn` names a database.

    :ivar directory: where the cluster, its socket and its log live
    """

    def __init__(self):
        self._bin = binaries()
        self.directory = tempfile.mkdtemp(prefix="hero-pg-")
        os.chmod(self.directory, 0o755)
        self.data = os.path.join(self.directory, "data")
        self.socket_dir = os.path.join(self.directory, "sock")
        self.log = os.path.join(self.directory, "server.log")
        self.password = secrets.token_hex(12)
        self._names = itertools.count(1)
        os.mkdir(self.socket_dir)
        if os.getuid() == 0:
            shutil.chown(self.directory, "postgres")
            shutil.chown(self.socket_dir, "postgres")

    def _run(self, *args, check=True):
        command = [os.path.join(self._bin, args[0]), *args[1:]]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, check=check, capture_output=True, text=True, timeout=120
        )

    def init(self):
        """``initdb`` with password authentication on the socket."""
        pwfile = os.path.join(self.directory, "pw")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if os.getuid() == 0:
            shutil.chown(pwfile, "postgres")
        self._run(
            "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth-local=scram-sha-256",
            "--auth-host=reject",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
        )
        os.unlink(pwfile)

    def start(self):
        """Start the server (``pg_ctl -w``: returns once it accepts connections)."""
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.log,
            "-w",
            "-o",
            f"-c listen_addresses='' -k {self.socket_dir} -c fsync=off",
            "start",
        )

    def stop(self):
        """Stop the server at once (``-m fast``); nothing if it is not running."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)

    def dsn(self, dbname="postgres"):
        """:return: a ``postgresql://`` URI with the password, over the socket"""
        host = urllib.parse.quote(self.socket_dir, safe="")
        return f"postgresql://postgres:{self.password}@{host}/{dbname}"

    def new_database(self):
        """:return: the URI of a new, empty database"""
        import psycopg

        name = f"hero_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def remove(self):
        """Stop and delete everything."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
