"""The results store of a sweep: one SQLite file in the output folder.

It contains the sweep's experiment and config, and one row per trial: its config and that
config's hash, its status (pending, running, done or failed), attempts, timings, error
text and result. Only the driver process writes to it, and every write is one
transaction, so a crash leaves each trial either as it was or fully updated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STORE_NAME = "results.sqlite"
STATUSES = ("pending", "running", "done", "failed")

# Written to the SQLite header, so a database of another program is never taken for ours.
_APPLICATION_ID = 0x53444952  # "SDIR"
_SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE trials (
    key TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    error TEXT,
    result TEXT
);
"""


def config_hash(config: dict[str, Any]) -> str:
    """Return the SHA-256 of a config's canonical JSON form."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class TrialRow:
    """One trial as the store records it."""

    key: str
    position: int
    config: dict[str, Any]
    status: str
    attempts: int
    seconds: float | None
    error: str | None
    result: dict[str, Any] | None


class StoreError(ValueError):
    """The store file cannot be used: foreign, damaged, or of another sweep."""


class ResultStore:
    """The SQLite results store of one sweep, opened by the driver."""

    def __init__(self, connection: sqlite3.Connection, path: Path):
        self._connection = connection
        self.path = path

    @classmethod
    def open(
        cls,
        folder: str | Path,
        experiment: str,
        config: dict[str, Any],
        *,
        force: bool = False,
    ) -> ResultStore:
        """Open the store in ``folder``, creating it for a new sweep.

        Raises:
            StoreError: If the file is not a singledir store, or it contains another
                experiment, or a config that differs from ``config`` and ``force`` is
                False. Nothing in the file is changed in these cases.
        """
        path = Path(folder) / STORE_NAME
        if path.exists() and path.stat().st_size == 0:
            # SQLite creates an empty file before the first transaction; a process that
            # died then left nothing to keep.
            path.unlink()
        if path.exists():
            store = cls._open_existing(path)
            store._check_sweep(experiment, config, force)
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None)
        # One transaction, so a crash leaves either no tables or the whole store.
        with connection:
            connection.execute("BEGIN")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("experiment", json.dumps(experiment)),
                    ("config", json.dumps(config)),
                ],
            )
        return cls(connection, path)

    @classmethod
    def _open_existing(cls, path: Path) -> ResultStore:
        with open(path, "rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
        if header != _SQLITE_MAGIC:
            raise StoreError(
                f"{str(path)!r} is not a SQLite database, so it is not a singledir "
                "results store. Move it away or pass another --out folder."
            )
        # Read-write, but nothing is written before the checks below pass.
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            application = connection.execute("PRAGMA application_id").fetchone()[0]
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            # Reads every page, so damage past the header shows here, not mid-sweep.
            check = connection.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
        except sqlite3.DatabaseError as error:
            connection.close()
            raise StoreError(
                f"{str(path)!r} is damaged and cannot be read ({error}). Move it away "
                "or pass another --out folder."
            ) from None
        if application != _APPLICATION_ID:
            connection.close()
            raise StoreError(
                f"{str(path)!r} is a SQLite database of another program, not a "
                "singledir results store. Move it away or pass another --out folder."
            )
        if version != _SCHEMA_VERSION:
            connection.close()
            raise StoreError(
                f"{str(path)!r} has store format {version}, but this singledir reads "
                f"format {_SCHEMA_VERSION}. Pass another --out folder."
            )
        return cls(connection, path)

    def _check_sweep(
        self, experiment: str, config: dict[str, Any], force: bool
    ) -> None:
        meta = self.meta()
        if meta["experiment"] != experiment:
            raise StoreError(
                f"{str(self.path)!r} contains a {meta['experiment']} sweep, not "
                f"{experiment}. Pass another --out folder."
            )
        stored = meta["config"]
        changed = sorted(
            name
            for name in set(stored) | set(config)
            if stored.get(name) != config.get(name)
        )
        if not changed:
            return
        if not force:
            details = "; ".join(
                f"{name}: {stored.get(name)!r} before, {config.get(name)!r} now"
                for name in changed
            )
            raise StoreError(
                f"The sweep in {str(self.path.parent)!r} was run with other options "
                f"({details}). Pass the same options to resume it, --force to run the "
                "new config in this folder, or another --out folder."
            )
        logger.warning(
            "Config changed in %s (%s); --force keeps only the trials whose config is "
            "unchanged.",
            self.path,
            ", ".join(changed),
        )
        self._set_meta({"experiment": experiment, "config": config})

    def _set_meta(self, values: dict[str, Any]) -> None:
        with self._connection:
            self._connection.execute("BEGIN")
            self._connection.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(key, json.dumps(value)) for key, value in values.items()],
            )

    def meta(self) -> dict[str, Any]:
        """Return the sweep's experiment name and config."""
        rows = self._connection.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def register(self, trials: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Add every trial not yet in the store as pending, in one transaction.

        A trial already stored with another config (a sweep resumed with ``force``) is
        reset to pending with the new config, and one whose config is unchanged keeps
        its status. Trials in the store but not in ``trials`` are kept, so that a sweep
        narrowed with ``force`` and widened again does not lose them.
        """
        with self._connection:
            self._connection.execute("BEGIN")
            existing = dict(
                self._connection.execute("SELECT key, config_hash FROM trials")
            )
            for position, (key, config) in enumerate(trials):
                digest = config_hash(config)
                if existing.get(key) == digest:
                    self._connection.execute(
                        "UPDATE trials SET position = ? WHERE key = ?", (position, key)
                    )
                    continue
                self._connection.execute(
                    "INSERT OR REPLACE INTO trials (key, position, config, config_hash,"
                    " status, attempts) VALUES (?, ?, ?, ?, 'pending', 0)",
                    (key, position, json.dumps(config), digest),
                )

    def reset_running(self) -> list[str]:
        """Mark trials left running by a process that died as pending; return them."""
        with self._connection:
            self._connection.execute("BEGIN")
            keys = [
                key
                for (key,) in self._connection.execute(
                    "SELECT key FROM trials WHERE status = 'running' ORDER BY position"
                )
            ]
            self._connection.execute(
                "UPDATE trials SET status = 'pending' WHERE status = 'running'"
            )
        return keys

    def mark_running(self, key: str) -> None:
        with self._connection:
            self._connection.execute("BEGIN")
            self._connection.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, "
                "started = ?, finished = NULL WHERE key = ?",
                (time.time(), key),
            )

    def mark_done(self, key: str, result: dict[str, Any], seconds: float) -> None:
        with self._connection:
            self._connection.execute("BEGIN")
            self._connection.execute(
                "UPDATE trials SET status = 'done', finished = ?, seconds = ?, "
                "error = NULL, result = ? WHERE key = ?",
                (time.time(), seconds, json.dumps(result), key),
            )

    def mark_failed(self, key: str, error: str, seconds: float | None) -> None:
        with self._connection:
            self._connection.execute("BEGIN")
            self._connection.execute(
                "UPDATE trials SET status = 'failed', finished = ?, seconds = ?, "
                "error = ? WHERE key = ?",
                (time.time(), seconds, error, key),
            )

    def trials(self) -> list[TrialRow]:
        """Return every trial in sweep order."""
        rows = self._connection.execute(
            "SELECT key, position, config, status, attempts, seconds, error, result "
            "FROM trials ORDER BY position"
        ).fetchall()
        return [
            TrialRow(
                key=key,
                position=position,
                config=json.loads(config),
                status=status,
                attempts=attempts,
                seconds=seconds,
                error=error,
                result=None if result is None else json.loads(result),
            )
            for key, position, config, status, attempts, seconds, error, result in rows
        ]

    def counts(self) -> dict[str, int]:
        """Return the number of trials in each status."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, count in self._connection.execute(
            "SELECT status, COUNT(*) FROM trials GROUP BY status"
        ):
            counts[status] = count
        return counts

    def close(self) -> None:
        self._connection.close()


def open_for_reading(folder: str | Path) -> ResultStore:
    """Open an existing store to read its progress, as ``singledir status`` does."""
    path = Path(folder) / STORE_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"No results store in {str(folder)!r}: expected {str(path)!r}. Pass the "
            "--out folder of a sweep."
        )
    return ResultStore._open_existing(path)
