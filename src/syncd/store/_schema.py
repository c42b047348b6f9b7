"""The SQLite schema, as numbered migrations tracked by ``PRAGMA user_version``."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

#: Each entry moves the schema from version ``index`` to ``index + 1``. Never edit one that
#: has shipped; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE links (
        id           INTEGER PRIMARY KEY,
        po_id        INTEGER NOT NULL UNIQUE,
        po_number    TEXT    NOT NULL,
        state        TEXT    NOT NULL,
        resume_state TEXT,
        reason       TEXT,
        so_id        INTEGER UNIQUE,
        so_number    TEXT,
        currency     TEXT,
        snapshot     BLOB,
        lines        BLOB,
        notes        BLOB,
        last_error   TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        state_since  REAL    NOT NULL
    );
    CREATE INDEX links_state ON links (state, state_since);
    CREATE INDEX links_po_number ON links (po_number);

    -- Every move of every order, never rewritten.
    CREATE TABLE transitions (
        id         INTEGER PRIMARY KEY,
        link_id    INTEGER NOT NULL REFERENCES links (id),
        from_state TEXT,
        to_state   TEXT    NOT NULL,
        trigger    TEXT    NOT NULL,
        cause      TEXT    NOT NULL,
        event_id   INTEGER,
        at         REAL    NOT NULL
    );
    CREATE INDEX transitions_link ON transitions (link_id, id);
    CREATE TRIGGER transitions_no_update BEFORE UPDATE ON transitions
    BEGIN SELECT RAISE(ABORT, 'transitions are append-only'); END;
    CREATE TRIGGER transitions_no_delete BEFORE DELETE ON transitions
    BEGIN SELECT RAISE(ABORT, 'transitions are append-only'); END;

    -- What the pollers, webhooks and effects saw, kept until the dispatcher has decided.
    CREATE TABLE inbox (
        id           INTEGER PRIMARY KEY,
        source       TEXT    NOT NULL,
        kind         TEXT    NOT NULL,
        dedup_key    TEXT    UNIQUE,
        po_id        INTEGER,
        so_id        INTEGER,
        link_id      INTEGER,
        payload      BLOB    NOT NULL,
        received_at  REAL    NOT NULL,
        processed_at REAL,
        outcome      TEXT
    );
    CREATE INDEX inbox_pending ON inbox (id) WHERE processed_at IS NULL;
    CREATE INDEX inbox_link ON inbox (link_id, id);

    CREATE TABLE cursors (
        name       TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    """
    -- What syncd saw of a PO it did not link (a draft, another supplier's, created before
    -- activation), for `syncctl explain`: one row per PO, updated in place, the oldest
    -- pruned beyond a bound.
    CREATE TABLE po_observations (
        po_id         INTEGER PRIMARY KEY,
        po_number     TEXT    NOT NULL,
        supplier      TEXT,
        status        TEXT    NOT NULL,
        reason        TEXT    NOT NULL,
        po_created_at REAL,
        first_seen_at REAL    NOT NULL,
        seen_at       REAL    NOT NULL
    );
    CREATE INDEX po_observations_number ON po_observations (po_number);
    CREATE INDEX po_observations_seen ON po_observations (seen_at);

    -- What the daemon made of each `syncctl import` (its inbox event), for `--wait` and
    -- `explain`: one row per operator request.
    CREATE TABLE import_outcomes (
        event_id   INTEGER PRIMARY KEY,
        po_number  TEXT    NOT NULL,
        result     TEXT    NOT NULL,
        detail     TEXT    NOT NULL,
        po_id      INTEGER,
        decided_at REAL    NOT NULL
    );
    CREATE INDEX import_outcomes_number ON import_outcomes (po_number, event_id);
    """,
)
