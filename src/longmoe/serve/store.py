"""What the server keeps across restarts: uploaded files and cached contents. Metadata lives in SQLite
(`longmoe.db`), bytes in plain files beside it:

    DATA_DIR/longmoe.db           files, cached_contents and uploads tables
    DATA_DIR/files/<id>           the bytes of each uploaded file
    DATA_DIR/caches/<id>.json     the conversation (resolved to text) each cached content holds
    DATA_DIR/uploads/<token>      an upload in progress

Every write is atomic: bytes are written to a temporary name, flushed to disk and renamed into place before the
row that lists them is committed, and startup deletes bytes that no row lists (a crash between the two steps) and
every unfinished upload (a crash mid-upload leaves no half file listed; the client starts the upload again).

The default directory is under the user's data home ($XDG_DATA_HOME/longmoe, else ~/.local/share/longmoe);
LONGMOE_DATA_DIR or `longmoe serve --data-dir` moves it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sqlite3
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_ALPHABET = string.ascii_lowercase + string.digits  # the Gemini SDK only accepts lowercase alphanumeric ids
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, display_name TEXT, mime_type TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL, create_time REAL NOT NULL, state TEXT NOT NULL DEFAULT 'ACTIVE', error TEXT);
CREATE TABLE IF NOT EXISTS uploads (
    token TEXT PRIMARY KEY, file_id TEXT NOT NULL, display_name TEXT, mime_type TEXT NOT NULL, size_bytes INTEGER,
    create_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cached_contents (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, display_name TEXT, token_count INTEGER NOT NULL,
    create_time REAL NOT NULL, update_time REAL NOT NULL, expire_time REAL NOT NULL);
"""


def default_data_dir() -> Path:
    if os.environ.get("LONGMOE_DATA_DIR"):
        return Path(os.environ["LONGMOE_DATA_DIR"])
    home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(home) / "longmoe"


def new_id(n: int = 12) -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(n))


class StoreError(ValueError):
    """A request the store cannot honour (a wrong upload offset, a size that does not match); the message says why."""


@dataclass
class FileRecord:
    id: str
    display_name: str | None
    mime_type: str
    size_bytes: int
    sha256: str
    create_time: float
    state: str = "ACTIVE"  # PROCESSING (media being checked) | ACTIVE | FAILED
    error: str | None = None  # why it FAILED


@dataclass
class UploadRecord:
    token: str
    file_id: str
    display_name: str | None
    mime_type: str
    size_bytes: int | None  # declared by the client at start (None: unknown until finalize)
    create_time: float


@dataclass
class CacheRecord:
    id: str
    model: str
    display_name: str | None
    token_count: int
    create_time: float
    update_time: float
    expire_time: float  # seconds since the epoch (wall clock: it must mean the same after a restart)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """SQLite + a data directory. Safe to call from the event loop and worker threads (one lock around the
    database; chunk writes of one upload are serialised by its own lock)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_dir, self.caches_dir, self.uploads_dir = (self.root / d for d in ("files", "caches", "uploads"))
        for d in (self.files_dir, self.caches_dir, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._upload_locks: dict[str, threading.Lock] = {}
        self.db = sqlite3.connect(self.root / "longmoe.db", check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # with WAL: consistent after a crash, fsync per checkpoint
            self.db.executescript(SCHEMA)
            columns = {r["name"] for r in self.db.execute("PRAGMA table_info(files)")}
            if "state" not in columns:  # a database made before media files had states
                self.db.execute("ALTER TABLE files ADD COLUMN state TEXT NOT NULL DEFAULT 'ACTIVE'")
                self.db.execute("ALTER TABLE files ADD COLUMN error TEXT")
        self._recover()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _recover(self) -> None:
        """Startup: drop unfinished uploads and bytes that no row lists; drop rows whose bytes are gone."""
        with self._lock:
            self.db.execute("DELETE FROM uploads")
            files = {r["id"] for r in self.db.execute("SELECT id FROM files")}
            caches = {r["id"] for r in self.db.execute("SELECT id FROM cached_contents")}
        for p in self.uploads_dir.iterdir():
            p.unlink(missing_ok=True)
        for p in self.files_dir.iterdir():
            if p.name not in files:
                p.unlink(missing_ok=True)
        for p in self.caches_dir.iterdir():
            if p.suffix != ".json" or p.stem not in caches:
                p.unlink(missing_ok=True)
        with self._lock:
            for fid in files:
                if not (self.files_dir / fid).exists():
                    self.db.execute("DELETE FROM files WHERE id = ?", (fid,))
            for cid in caches:
                if not (self.caches_dir / f"{cid}.json").exists():
                    self.db.execute("DELETE FROM cached_contents WHERE id = ?", (cid,))

    # ---------------------------------------------------------------------------------------------------------------
    # files

    def start_upload(self, file_id: str | None, display_name: str | None, mime_type: str, size: int | None) -> str:
        """Open an upload session; returns its token (the capability in the upload URL)."""
        with self._lock:
            if file_id is None:
                file_id = new_id()
            elif self.get_file(file_id) is not None or self.db.execute(
                "SELECT 1 FROM uploads WHERE file_id = ?", (file_id,)
            ).fetchone():
                raise FileExistsError(file_id)
            token = secrets.token_urlsafe(24)
            self.db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?)",
                (token, file_id, display_name, mime_type, size, time.time()),
            )
            (self.uploads_dir / token).touch()
            self._upload_locks[token] = threading.Lock()
            return token

    def get_upload(self, token: str) -> UploadRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM uploads WHERE token = ?", (token,)).fetchone()
        return UploadRecord(**dict(row)) if row else None

    def received(self, token: str) -> int:
        return (self.uploads_dir / token).stat().st_size

    def write_chunk(self, token: str, offset: int, data: bytes) -> int:
        """Append `data` at `offset` (which must be the bytes received so far); returns the new total."""
        upload = self.get_upload(token)
        if upload is None:
            raise KeyError(token)
        with self._upload_locks.setdefault(token, threading.Lock()):
            part = self.uploads_dir / token
            have = part.stat().st_size
            if offset != have:
                raise StoreError(f"X-Goog-Upload-Offset is {offset} but {have} bytes have been received")
            if upload.size_bytes is not None and have + len(data) > upload.size_bytes:
                raise StoreError(
                    f"the upload is {have + len(data)} bytes, more than the {upload.size_bytes} declared at start "
                    "(X-Goog-Upload-Header-Content-Length)"
                )
            with open(part, "ab") as f:
                f.write(data)
            return have + len(data)

    def finalize_upload(self, token: str, state: str = "ACTIVE") -> FileRecord:
        upload = self.get_upload(token)
        if upload is None:
            raise KeyError(token)
        with self._upload_locks.setdefault(token, threading.Lock()):
            part = self.uploads_dir / token
            size = part.stat().st_size
            if upload.size_bytes is not None and size != upload.size_bytes:
                raise StoreError(f"finalized after {size} bytes, but {upload.size_bytes} were declared at start")
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                os.fsync(f.fileno())
            os.replace(part, self.files_dir / upload.file_id)
            _fsync_dir(self.files_dir)
            record = FileRecord(upload.file_id, upload.display_name, upload.mime_type, size, digest.hexdigest(),
                                time.time(), state)  # fmt: skip
            with self._lock:
                self.db.execute("BEGIN")
                self.db.execute(
                    "INSERT INTO files (id, display_name, mime_type, size_bytes, sha256, create_time, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.display_name, record.mime_type, record.size_bytes, record.sha256,
                     record.create_time, record.state),
                )  # fmt: skip
                self.db.execute("DELETE FROM uploads WHERE token = ?", (token,))
                self.db.execute("COMMIT")
        self._upload_locks.pop(token, None)
        return record

    def cancel_upload(self, token: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM uploads WHERE token = ?", (token,))
        (self.uploads_dir / token).unlink(missing_ok=True)
        self._upload_locks.pop(token, None)

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return FileRecord(**dict(row)) if row else None

    def list_files(self, offset: int, limit: int) -> tuple[list[FileRecord], int | None]:
        """A page of files, oldest first, and the offset of the next page (None at the end)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT * FROM files ORDER BY create_time, id LIMIT ? OFFSET ?", (limit + 1, offset)
            ).fetchall()
        items = [FileRecord(**dict(r)) for r in rows[:limit]]
        return items, (offset + limit if len(rows) > limit else None)

    def files_in_state(self, state: str) -> list[str]:
        with self._lock:
            return [r["id"] for r in self.db.execute("SELECT id FROM files WHERE state = ?", (state,))]

    def set_file_state(self, file_id: str, state: str, error: str | None = None) -> None:
        with self._lock:
            self.db.execute("UPDATE files SET state = ?, error = ? WHERE id = ?", (state, error, file_id))

    def read_file(self, file_id: str) -> bytes:
        return (self.files_dir / file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            gone = self.db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        (self.files_dir / file_id).unlink(missing_ok=True)  # after the row: a crash in between leaves an orphan
        return gone

    # ---------------------------------------------------------------------------------------------------------------
    # cached contents

    def put_cache(self, record: CacheRecord, messages: list[dict[str, Any]]) -> None:
        # media bytes in a conversation are kept as {"$base64": ...}
        def encode(x: Any) -> Any:
            if isinstance(x, (bytes, bytearray)):
                return {"$base64": base64.b64encode(x).decode()}
            raise TypeError(f"cannot store {type(x).__name__} in a cached content")

        atomic_write(self.caches_dir / f"{record.id}.json", json.dumps(messages, default=encode).encode())
        with self._lock:
            self.db.execute(
                "INSERT INTO cached_contents VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.model, record.display_name, record.token_count, record.create_time,
                 record.update_time, record.expire_time),
            )  # fmt: skip

    def get_cache(self, cache_id: str) -> CacheRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM cached_contents WHERE id = ?", (cache_id,)).fetchone()
        return CacheRecord(**dict(row)) if row else None

    def cache_messages(self, cache_id: str) -> list[dict[str, Any]]:
        def decode(d: dict[str, Any]) -> Any:
            return base64.b64decode(d["$base64"]) if set(d) == {"$base64"} else d

        return json.loads((self.caches_dir / f"{cache_id}.json").read_text(encoding="utf-8"), object_hook=decode)

    def list_caches(self, offset: int, limit: int) -> tuple[list[CacheRecord], int | None]:
        with self._lock:
            rows = self.db.execute(
                "SELECT * FROM cached_contents ORDER BY create_time, id LIMIT ? OFFSET ?", (limit + 1, offset)
            ).fetchall()
        items = [CacheRecord(**dict(r)) for r in rows[:limit]]
        return items, (offset + limit if len(rows) > limit else None)

    def update_cache(self, cache_id: str, expire_time: float) -> CacheRecord | None:
        with self._lock:
            self.db.execute(
                "UPDATE cached_contents SET expire_time = ?, update_time = ? WHERE id = ?",
                (expire_time, time.time(), cache_id),
            )
            return self.get_cache(cache_id)

    def delete_cache(self, cache_id: str) -> bool:
        with self._lock:
            gone = self.db.execute("DELETE FROM cached_contents WHERE id = ?", (cache_id,)).rowcount > 0
        (self.caches_dir / f"{cache_id}.json").unlink(missing_ok=True)
        return gone

    def expired_caches(self, now: float) -> list[str]:
        with self._lock:
            return [r["id"] for r in self.db.execute("SELECT id FROM cached_contents WHERE expire_time <= ?", (now,))]
