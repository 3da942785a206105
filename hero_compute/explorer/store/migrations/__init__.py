"""
The PostgreSQL schema, as numbered steps: step ``n`` takes a database from version
``n - 1`` to ``n``.  An explorer applies the missing steps at start, one transaction
each, under an advisory lock (two explorers starting at once never both migrate), and
refuses a database whose version is higher than the last step it knows.

A released step is never edited: a change is a new step.  (The SQLite file keeps its
own single-step schema in :mod:`..schema`: one explorer owns it.)
"""

#: Step number -> the statements of that step.
POSTGRES = {
    1: (
        """CREATE TABLE nodes (
            node_id text PRIMARY KEY, name text NOT NULL, socket_path text NOT NULL,
            transport text NOT NULL, version text NOT NULL, capacity text NOT NULL,
            usage text NOT NULL, vm_count integer NOT NULL, labels text NOT NULL,
            first_seen double precision NOT NULL, last_seen double precision NOT NULL)""",
        # Serials are lowercase hex text, as in SQLite: up to 159 bits.
        """CREATE TABLE identities (
            node_id text PRIMARY KEY, secret_sha256 text,
            enrolled integer NOT NULL DEFAULT 0, cert_serial text, previous_serial text,
            revoked_at double precision)""",
        """CREATE TABLE tokens (
            token_hash text PRIMARY KEY, node_id text,
            expires_at double precision NOT NULL, used integer NOT NULL DEFAULT 0)""",
        "CREATE INDEX tokens_by_expiry ON tokens (expires_at)",
        """CREATE TABLE revoked_serials (
            serial text PRIMARY KEY, node_id text NOT NULL,
            revoked_at double precision NOT NULL)""",
        "CREATE INDEX revoked_serials_by_node ON revoked_serials (node_id)",
        """CREATE TABLE revoked_secrets (
            secret_sha256 text PRIMARY KEY, node_id text NOT NULL,
            revoked_at double precision NOT NULL)""",
        # What the other explorers must re-read: one row per change of an identity,
        # in commit order (writers hold one advisory lock), announced by NOTIFY and
        # polled as the fallback.
        """CREATE TABLE changes (
            seq bigserial PRIMARY KEY, node_id text NOT NULL,
            at double precision NOT NULL)""",
    ),
    # Revocation that outlives re-enrollment and removal (issue 17), as SQLite's
    # schema 2: the last revocation of each id, and every certificate signed and when.
    2: (
        """CREATE TABLE revoked_ids (
            node_id text PRIMARY KEY, revoked_at double precision NOT NULL)""",
        """CREATE TABLE issued_serials (
            serial text PRIMARY KEY, node_id text NOT NULL,
            issued_at double precision NOT NULL)""",
        "CREATE INDEX issued_serials_by_node ON issued_serials (node_id)",
        """INSERT INTO revoked_ids (node_id, revoked_at)
            SELECT node_id, revoked_at FROM identities WHERE revoked_at IS NOT NULL
            ON CONFLICT DO NOTHING""",
    ),
    # The audit log, as SQLite's schema 3.
    3: (
        """CREATE TABLE audit (
            id bigserial PRIMARY KEY, time double precision NOT NULL,
            explorer text NOT NULL, caller text NOT NULL, method text NOT NULL,
            target text NOT NULL, outcome text NOT NULL)""",
        "CREATE INDEX audit_by_time ON audit (time)",
    ),
    # The dashboard's login tokens, as SQLite's schema 4; a change row now says what
    # changed: a node id's identity, or a dashboard user's tokens.
    4: (
        """CREATE TABLE ui_tokens (
            token_hash text PRIMARY KEY, user_name text NOT NULL, role text NOT NULL,
            created_at double precision NOT NULL, expires_at double precision NOT NULL,
            used_at double precision, revoked_at double precision)""",
        "CREATE INDEX ui_tokens_by_user ON ui_tokens (user_name)",
        "CREATE INDEX ui_tokens_by_expiry ON ui_tokens (expires_at)",
        "ALTER TABLE changes ADD COLUMN kind text NOT NULL DEFAULT 'node'",
    ),
}

#: The version the last step makes.
LATEST = max(POSTGRES)
