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
    # SQLite cannot change a table's keys in place: the tables whose keys change are
    # rebuilt (copied into a new table, the old one dropped, the new one renamed; the
    # backend runs migrations with foreign keys off and checks them before committing).
    """
    -- Many factories (each one TradeGecko account linked with one Katana account) in one
    -- database: every per-factory row names its factory, and what was there before is the
    -- factory `default`'s. Ids and keys from TradeGecko and Katana are unique within a
    -- factory only (two factories are different accounts). Transitions reach their factory
    -- through their link.
    CREATE TABLE meta_new (
        key     TEXT NOT NULL,
        value   TEXT NOT NULL,
        factory TEXT NOT NULL DEFAULT 'default',
        PRIMARY KEY (factory, key)
    );
    INSERT INTO meta_new (key, value) SELECT key, value FROM meta;
    DROP TABLE meta;
    ALTER TABLE meta_new RENAME TO meta;

    CREATE TABLE links_new (
        id           INTEGER PRIMARY KEY,
        po_id        INTEGER NOT NULL,
        po_number    TEXT    NOT NULL,
        state        TEXT    NOT NULL,
        resume_state TEXT,
        reason       TEXT,
        so_id        INTEGER,
        so_number    TEXT,
        currency     TEXT,
        snapshot     BLOB,
        lines        BLOB,
        notes        BLOB,
        last_error   TEXT,
        created_at   REAL    NOT NULL,
        updated_at   REAL    NOT NULL,
        state_since  REAL    NOT NULL,
        factory      TEXT    NOT NULL DEFAULT 'default'
    );
    INSERT INTO links_new (id, po_id, po_number, state, resume_state, reason, so_id,
        so_number, currency, snapshot, lines, notes, last_error, created_at, updated_at,
        state_since)
    SELECT id, po_id, po_number, state, resume_state, reason, so_id, so_number, currency,
        snapshot, lines, notes, last_error, created_at, updated_at, state_since FROM links;
    DROP TABLE links;
    ALTER TABLE links_new RENAME TO links;
    CREATE UNIQUE INDEX links_factory_po ON links (factory, po_id);
    CREATE UNIQUE INDEX links_factory_so ON links (factory, so_id);
    CREATE INDEX links_state ON links (factory, state, state_since);
    CREATE INDEX links_po_number ON links (factory, po_number);

    CREATE TABLE inbox_new (
        id           INTEGER PRIMARY KEY,
        source       TEXT    NOT NULL,
        kind         TEXT    NOT NULL,
        dedup_key    TEXT,
        po_id        INTEGER,
        so_id        INTEGER,
        link_id      INTEGER,
        payload      BLOB    NOT NULL,
        received_at  REAL    NOT NULL,
        processed_at REAL,
        outcome      TEXT,
        factory      TEXT    NOT NULL DEFAULT 'default'
    );
    INSERT INTO inbox_new (id, source, kind, dedup_key, po_id, so_id, link_id, payload,
        received_at, processed_at, outcome)
    SELECT id, source, kind, dedup_key, po_id, so_id, link_id, payload, received_at,
        processed_at, outcome FROM inbox;
    DROP TABLE inbox;
    ALTER TABLE inbox_new RENAME TO inbox;
    CREATE UNIQUE INDEX inbox_factory_dedup ON inbox (factory, dedup_key);
    CREATE INDEX inbox_pending ON inbox (factory, id) WHERE processed_at IS NULL;
    CREATE INDEX inbox_link ON inbox (link_id, id);

    CREATE TABLE cursors_new (
        name       TEXT NOT NULL,
        value      TEXT NOT NULL,
        updated_at REAL NOT NULL,
        factory    TEXT NOT NULL DEFAULT 'default',
        PRIMARY KEY (factory, name)
    );
    INSERT INTO cursors_new (name, value, updated_at) SELECT name, value, updated_at
        FROM cursors;
    DROP TABLE cursors;
    ALTER TABLE cursors_new RENAME TO cursors;

    CREATE TABLE po_observations_new (
        po_id         INTEGER NOT NULL,
        po_number     TEXT    NOT NULL,
        supplier      TEXT,
        status        TEXT    NOT NULL,
        reason        TEXT    NOT NULL,
        po_created_at REAL,
        first_seen_at REAL    NOT NULL,
        seen_at       REAL    NOT NULL,
        factory       TEXT    NOT NULL DEFAULT 'default',
        PRIMARY KEY (factory, po_id)
    );
    INSERT INTO po_observations_new (po_id, po_number, supplier, status, reason,
        po_created_at, first_seen_at, seen_at)
    SELECT po_id, po_number, supplier, status, reason, po_created_at, first_seen_at, seen_at
        FROM po_observations;
    DROP TABLE po_observations;
    ALTER TABLE po_observations_new RENAME TO po_observations;
    CREATE INDEX po_observations_number ON po_observations (factory, po_number);
    CREATE INDEX po_observations_seen ON po_observations (factory, seen_at);

    -- An inbox event's id is unique across factories: the key stays.
    ALTER TABLE import_outcomes ADD COLUMN factory TEXT NOT NULL DEFAULT 'default';
    DROP INDEX import_outcomes_number;
    CREATE INDEX import_outcomes_number ON import_outcomes (factory, po_number, event_id);

    -- Which daemon owns each factory: the owner, until when (the database's clock), and a
    -- fencing number raised at every takeover, which every write of the owner re-checks.
    -- A row is never deleted (a released lease only expires), so the number never goes
    -- back.
    CREATE TABLE leases (
        factory    TEXT    PRIMARY KEY,
        owner      TEXT    NOT NULL,
        fence      INTEGER NOT NULL,
        expires_at REAL    NOT NULL,
        renewed_at REAL    NOT NULL
    );

    -- Every running daemon's heartbeat, for sharing the factories among the live ones.
    CREATE TABLE daemons (
        owner      TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        seen_at    REAL NOT NULL
    );
    """,
    """
    -- A shadow run's plan (`syncd run --shadow`): per order and effect, the first writing
    -- request the effect would have sent, withheld. Replaced when the effect runs again.
    CREATE TABLE plans (
        factory    TEXT    NOT NULL DEFAULT 'default',
        link_id    INTEGER NOT NULL,
        effect     TEXT    NOT NULL,
        po_number  TEXT    NOT NULL,
        service    TEXT    NOT NULL,
        method     TEXT    NOT NULL,
        endpoint   TEXT    NOT NULL,
        path       TEXT    NOT NULL,
        body       TEXT,
        planned_at REAL    NOT NULL,
        PRIMARY KEY (factory, link_id, effect)
    );
    """,
    """
    -- A shadow run's plan holds every write of an effect, in order (was: its first only),
    -- with the placeholder answer each was given and what explains it to a person (the
    -- SKUs of an SO's rows, a re-costed line's price before and after).
    CREATE TABLE plans_new (
        factory    TEXT    NOT NULL DEFAULT 'default',
        link_id    INTEGER NOT NULL,
        effect     TEXT    NOT NULL,
        seq        INTEGER NOT NULL DEFAULT 0,
        po_number  TEXT    NOT NULL,
        service    TEXT    NOT NULL,
        method     TEXT    NOT NULL,
        endpoint   TEXT    NOT NULL,
        path       TEXT    NOT NULL,
        body       TEXT,
        answer     TEXT,
        detail     TEXT,
        planned_at REAL    NOT NULL,
        PRIMARY KEY (factory, link_id, effect, seq)
    );
    INSERT INTO plans_new (factory, link_id, effect, seq, po_number, service, method,
        endpoint, path, body, planned_at)
    SELECT factory, link_id, effect, 0, po_number, service, method, endpoint, path, body,
        planned_at FROM plans;
    DROP TABLE plans;
    ALTER TABLE plans_new RENAME TO plans;
    """,
    """
    -- What each service's variant ids are called (the SKU): TradeGecko's variant id → SKU
    -- (read per PO line), Katana's SKU → variant id (the SO rows). A cache: an entry is
    -- dropped when the service refuses the id or a webhook says the variant changed, and
    -- trusted for a while only (seen_at).
    CREATE TABLE variants (
        factory    TEXT    NOT NULL DEFAULT 'default',
        service    TEXT    NOT NULL,
        variant_id INTEGER NOT NULL,
        sku        TEXT    NOT NULL,
        seen_at    REAL NOT NULL,
        PRIMARY KEY (factory, service, variant_id)
    );
    CREATE INDEX variants_sku ON variants (factory, service, sku);
    """,
    """
    -- What the webhook consumer knows of the Katana production behind followed SOs, so that
    -- deliveries are taken at their word across a restart. A look at an SO keeps what it
    -- saw (its facts, whether a live row waits for an MO) and places the MOs its rows
    -- link; the signed deliveries heard since (inbox ids order them) say each MO's status
    -- and the SO's, and an SO delivery that may be a row edit marks the look stale.
    CREATE TABLE so_evidence (
        factory TEXT    NOT NULL DEFAULT 'default',
        so_id   INTEGER NOT NULL,
        looked  INTEGER NOT NULL,
        facts   TEXT    NOT NULL,
        waiting INTEGER NOT NULL,
        status  TEXT,
        heard   INTEGER,
        edited  INTEGER,
        PRIMARY KEY (factory, so_id)
    );
    CREATE TABLE mo_placements (
        factory TEXT    NOT NULL DEFAULT 'default',
        mo_id   INTEGER NOT NULL,
        so_id   INTEGER,
        placed  INTEGER NOT NULL,
        status  TEXT,
        heard   INTEGER,
        PRIMARY KEY (factory, mo_id)
    );
    CREATE INDEX mo_placements_so ON mo_placements (factory, so_id);
    """,
)
