"""Where runs live: checkpoints, the call log, the run registry and source blobs.

A store is one SQLite file (the default, in a per-user data directory) or one
PostgreSQL database (a ``postgresql://`` URL). Both go through the same code:
LangGraph's async savers hold the graph's checkpoints, and LangGraph's async
key-value stores (``AsyncSqliteStore`` / ``AsyncPostgresStore``) hold the rest
under the ``rlm_graph`` namespace:

- ``("rlm_graph", "meta")``: the store format version, so a newer format or a
  foreign file is refused before anything is written;
- ``("rlm_graph", "calls")``: the durable call log, one completion per key of
  what was sent (:func:`rlm_graph.models.call_key`), written the moment the call
  returns;
- ``("rlm_graph", "runs")``: one record per run (question, source identity,
  config without secrets, plan, status, progress, result);
- ``("rlm_graph", "sources", <sha256>)``: each source's text once, by content
  hash, in 1 MB parts; checkpoints hold spans into it, never text.

Only one process at a time may drive a run: :meth:`Store.lock_run` takes an
advisory lock (``flock`` on a file beside the SQLite file, or
``pg_try_advisory_lock`` on PostgreSQL). Both are released by the operating
system or the server when the holder dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Literal

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.store.sqlite import AsyncSqliteStore
from pydantic import BaseModel, Field

from rlm_graph.errors import RunBusyError, StoreError
from rlm_graph.models import Completion
from rlm_graph.source import Source, source_from_documents

__all__ = [
    "STORE_ENV",
    "STORE_FORMAT",
    "RunRecord",
    "Store",
    "default_location",
    "open_store",
    "resolve_location",
]

logger = logging.getLogger(__name__)

STORE_ENV = "RLM_GRAPH_STORE"
STORE_FORMAT = 1
"""Bumped when a store written by this version cannot be read by an older one."""

PRODUCT = "rlm-graph"
SOURCE_PART_CHARS = 1 << 20
_NS = "rlm_graph"
_META = (_NS, "meta")
_CALLS = (_NS, "calls")
_RUNS = (_NS, "runs")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OUR_TABLES = {"checkpoints", "writes", "store", "checkpoint_migrations", "store_migrations"}

RunState = Literal["running", "interrupted", "stopped", "done", "partial", "failed"]


class SourceInfo(BaseModel):
    """A run's source identity: its digest and each file's name and hash."""

    digest: str
    chars: int
    files: list[dict[str, Any]] = Field(default_factory=list)
    """Each file: ``name``, ``path`` (absolute, when read from disk), ``sha256``."""


class RunRecord(BaseModel):
    """What the registry keeps about one run."""

    run_id: str
    status: RunState = "running"
    question: str
    source: SourceInfo
    config: dict[str, Any]
    """The run configuration without secrets."""
    plan: dict[str, Any]
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    executions: int = 1
    """How many times the graph was started from the top (1 + re-executions)."""
    progress: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    parent: dict[str, str] | None = None
    """For a run made inside a user's LangGraph graph (``rlm_node``): the
    parent's ``thread_id`` and the node's checkpoint ``namespace``. Its
    checkpoints are the parent's; resuming the parent resumes it."""
    format: int = STORE_FORMAT

    @property
    def thread_id(self) -> str:
        """The LangGraph thread of the current execution."""
        return self.run_id if self.executions <= 1 else f"{self.run_id}/{self.executions}"


def default_location() -> Path:
    """The per-user SQLite store: ``<user data dir>/rlm-graph/store.sqlite``."""
    import platformdirs

    return Path(platformdirs.user_data_dir(PRODUCT, appauthor=False)) / "store.sqlite"


def resolve_location(location: str | os.PathLike[str] | None) -> str:
    """The store to use: the argument, else ``$RLM_GRAPH_STORE``, else the default file."""
    if location is None or str(location) == "":
        location = os.environ.get(STORE_ENV) or default_location()
    return str(location)


def is_postgres(location: str) -> bool:
    """Whether a store location is a PostgreSQL URL."""
    return location.startswith(("postgresql://", "postgres://"))


def redact(location: str) -> str:
    """A store location fit for messages: a URL's password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", location)


@contextlib.asynccontextmanager
async def open_store(
    location: str | os.PathLike[str] | None = None, *, create: bool = True
) -> AsyncIterator[Store]:
    """Open (and create, if new) a store; closes it on exit.

    Args:
        location: a SQLite file path, a ``postgresql://`` URL, or ``"memory"``
            for a store that lives only as long as this context; None uses
            ``$RLM_GRAPH_STORE`` or the per-user default file.
        create: make a new SQLite store if there is none; with False a missing
            file is an error (for commands that only read runs).

    Raises:
        StoreError: the file is not an rlm-graph store, was written by a newer
            version, or the database cannot be reached.
    """
    where = resolve_location(location)
    if where == "memory":
        async with _open_memory() as store:
            yield store
    elif is_postgres(where):
        async with _open_postgres(where) as store:
            yield store
    else:
        path = Path(where).expanduser()
        if not create and not await asyncio.to_thread(path.exists):
            msg = f"There is no rlm-graph store at {path}: nothing has run with it yet."
            raise StoreError(msg)
        async with _open_sqlite(path) as store:
            yield store


class Store:
    """An open store. Use :func:`open_store` to get one.

    Attributes:
        location: where it is, fit for messages (passwords redacted).
        saver: the LangGraph checkpointer for graph runs.
        kv: the LangGraph key-value store holding calls, runs and sources.
    """

    durable = True
    """As a call log: it survives the process (as long as the store does)."""

    def __init__(self, location: str, saver: Any, kv: Any, locker: _Locker) -> None:
        self.location = location
        self.saver = saver
        self.kv = kv
        self._locker = locker

    # -- call log -------------------------------------------------------------

    async def get(self, key: str) -> Completion | None:
        """The recorded completion of a call key (the :class:`CallLog` protocol)."""
        try:
            item = await self.kv.aget(_CALLS, key)
        except Exception as exc:
            raise self._failed("read the call log", exc) from exc
        if item is None:
            return None
        try:
            return Completion(**item.value)
        except TypeError:
            logger.warning("ignoring an unreadable call-log entry %s", key[:12])
            return None

    async def put(self, key: str, completion: Completion) -> None:
        """Record a completion durably (committed when this returns)."""
        value = asdict(completion)
        value["cached"] = False
        try:
            await self.kv.aput(_CALLS, key, value, index=False)
        except Exception as exc:
            raise self._failed("record a finished call", exc) from exc

    def _failed(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"Could not {what} in the store {self.location}: {redact(str(exc))}")

    async def count_calls(self) -> int:
        """How many calls the log holds."""
        return len(await _search_all(self.kv, _CALLS))

    # -- sources --------------------------------------------------------------

    async def save_source(self, source: Source) -> None:
        """Store a source's text once, by content hash (a no-op when present)."""
        namespace = (_NS, "sources", source.digest)
        if await self.kv.aget(namespace, "index") is not None:
            return
        parts = range(0, max(len(source.text), 1), SOURCE_PART_CHARS)
        for number, offset in enumerate(parts):
            chunk = source.text[offset : offset + SOURCE_PART_CHARS]
            await self.kv.aput(namespace, f"{number:06d}", {"text": chunk}, index=False)
        files = [{"name": f.name, "start": f.start, "end": f.end} for f in source.files]
        # The index goes last: a source is present only when all its parts are.
        await self.kv.aput(namespace, "index", {"parts": len(parts), "files": files}, index=False)

    async def load_source(self, digest: str) -> Source:
        """Rebuild a stored source and check it against its digest.

        Raises:
            StoreError: the source is missing or its text no longer matches.
        """
        namespace = (_NS, "sources", digest)
        index = await self.kv.aget(namespace, "index")
        if index is None:
            msg = f"The source {digest[:12]} is not in the store {self.location}."
            raise StoreError(msg)
        chunks = []
        for number in range(index.value["parts"]):
            item = await self.kv.aget(namespace, f"{number:06d}")
            if item is None:
                msg = f"Part {number} of the source {digest[:12]} is missing from {self.location}."
                raise StoreError(msg)
            chunks.append(item.value["text"])
        text = "".join(chunks)
        documents = [(f["name"], text[f["start"] : f["end"]]) for f in index.value["files"]]
        source = source_from_documents(documents)
        if source.digest != digest:
            msg = f"The stored source {digest[:12]} is damaged (its hash no longer matches)."
            raise StoreError(msg)
        return source

    async def delete_source(self, digest: str) -> None:
        """Remove a stored source (when no run uses it any more)."""
        namespace = (_NS, "sources", digest)
        for item in await _search_all(self.kv, namespace):
            await self.kv.adelete(namespace, item.key)

    # -- run registry ---------------------------------------------------------

    async def save_run(self, record: RunRecord) -> None:
        """Create or replace a run's record."""
        record.updated_at = time.time()
        await self.kv.aput(_RUNS, record.run_id, record.model_dump(mode="json"), index=False)

    async def get_run(self, run_id: str) -> RunRecord:
        """A run's record.

        Raises:
            StoreError: there is no such run (the message lists near matches).
        """
        item = await self.kv.aget(_RUNS, run_id)
        if item is None:
            matches = [r.run_id for r in await self.list_runs() if r.run_id.startswith(run_id)]
            if len(matches) == 1:
                return await self.get_run(matches[0])
            hint = f" Did you mean {', '.join(matches[:5])}?" if matches else " 'rlm-graph runs' lists them."
            msg = f"No run {run_id!r} in the store {self.location}.{hint}"
            raise StoreError(msg)
        return RunRecord.model_validate(item.value)

    async def list_runs(self) -> list[RunRecord]:
        """Every run in the store, newest first; a running run whose process died
        shows as ``interrupted``."""
        records = []
        for item in await _search_all(self.kv, _RUNS):
            try:
                record = RunRecord.model_validate(item.value)
            except ValueError:
                logger.warning("skipping an unreadable run record %s", item.key)
                continue
            locked = await self._locker.is_locked(record.run_id)
            if locked:
                record.status = "running"
            elif record.status == "running":
                record.status = "interrupted"
            records.append(record)
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    async def delete_run(self, run_id: str) -> RunRecord:
        """Delete a run: its record, its checkpoints, and its source when no
        other run uses it. Recorded calls stay: other runs may reuse them.

        Raises:
            RunBusyError: another process is driving the run.
        """
        record = await self.get_run(run_id)
        async with self.lock_run(record.run_id):
            for execution in range(1, record.executions + 1):
                thread = record.run_id if execution == 1 else f"{record.run_id}/{execution}"
                await self.saver.adelete_thread(thread)
            await self.kv.adelete(_RUNS, record.run_id)
        others = [r for r in await self.list_runs() if r.source.digest == record.source.digest]
        if not others:
            await self.delete_source(record.source.digest)
        return record

    @contextlib.asynccontextmanager
    async def lock_run(self, run_id: str) -> AsyncIterator[None]:
        """Hold the run's lock for the block.

        Raises:
            RunBusyError: another process holds it.
        """
        async with self._locker.hold(run_id):
            yield


# -- opening ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _open_memory() -> AsyncIterator[Store]:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.store.memory import InMemoryStore

    yield Store("memory", InMemorySaver(), InMemoryStore(), _MemoryLocker())


@contextlib.asynccontextmanager
async def _open_sqlite(path: Path) -> AsyncIterator[Store]:
    import aiosqlite

    # File checks run in a thread: a store opened on a server's event loop
    # (the LangGraph dev server refuses blocking calls there) must not block it.
    await asyncio.to_thread(_prepare_sqlite_file, path)
    try:
        async with (
            aiosqlite.connect(path, timeout=60) as saver_conn,
            aiosqlite.connect(path, timeout=60, isolation_level=None) as kv_conn,
        ):
            await saver_conn.execute("PRAGMA busy_timeout = 60000")
            await kv_conn.execute("PRAGMA busy_timeout = 60000")
            saver = _ShieldedSqliteSaver(saver_conn)
            kv = _ImmediateSqliteStore(kv_conn)
            store = Store(str(path), saver, kv, _FileLocker(path))
            # Several runs may open a new store at once (an agent asking two
            # questions in one turn): its tables are made by one at a time.
            setup_lock = await asyncio.to_thread(_lock_setup, path)
            try:
                await saver.setup()
                await kv.setup()
                await _check_format(store)
            finally:
                await asyncio.to_thread(setup_lock.close)
            try:
                yield store
            finally:
                await saver.drain()
    except (sqlite3.DatabaseError, OSError) as exc:
        msg = f"Cannot use the store {path}: {exc}. Pick another file with --store PATH."
        raise StoreError(msg) from exc


class _ShieldedSqliteSaver(AsyncSqliteSaver):
    """AsyncSqliteSaver whose writes finish even when their caller is cancelled.

    The stock saver commits after its INSERT. A cancel between the two (a
    client leaving ``rlm-graph serve`` mid-run) left the transaction open, and
    closing the connection then did not end it: SQLite kept the closed
    connection alive for its unfinished statement, with the write lock, and
    every later writer of the file, other processes included, got "database
    is locked" (tests/test_serve.py, the disconnect test). Here each write runs
    to its commit in a task of its own, the caller is still cancelled at once,
    and :meth:`drain` waits for such writes before the connection closes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writing: set[asyncio.Task[Any]] = set()

    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        return await self._shielded(super().aput(*args, **kwargs))

    async def aput_writes(self, *args: Any, **kwargs: Any) -> None:
        await self._shielded(super().aput_writes(*args, **kwargs))

    async def adelete_thread(self, *args: Any, **kwargs: Any) -> None:
        await self._shielded(super().adelete_thread(*args, **kwargs))

    async def drain(self) -> None:
        """Wait for writes whose callers were cancelled."""
        if self._writing:
            await asyncio.wait(set(self._writing))

    async def _shielded(self, write: Coroutine[Any, Any, Any]) -> Any:
        task = asyncio.ensure_future(write)
        self._writing.add(task)
        task.add_done_callback(self._written)
        return await asyncio.shield(task)

    def _written(self, task: asyncio.Task[Any]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a checkpoint write failed: %s", task.exception())


class _ImmediateSqliteStore(AsyncSqliteStore):
    """AsyncSqliteStore whose transactions take the write lock when they begin.

    The stock store begins deferred transactions that read, then write. With the
    checkpointer writing the same file from another connection, SQLite cannot
    upgrade such a transaction and fails at once with "database is locked"
    instead of waiting (seen on an 800-call run). ``BEGIN IMMEDIATE`` waits for
    the busy timeout instead, and a failed batch is rolled back, not committed.
    """

    @contextlib.asynccontextmanager
    async def _cursor(self, *, transaction: bool = True) -> AsyncIterator[Any]:
        if not self.is_setup:
            await self.setup()
        async with self.lock:
            if transaction:
                await self.conn.execute("BEGIN IMMEDIATE")
            async with self.conn.cursor() as cur:
                try:
                    yield cur
                except BaseException:
                    if transaction:
                        await self.conn.execute("ROLLBACK")
                    raise
                if transaction:
                    await self.conn.execute("COMMIT")


_SETUP_LOCK_KEY = int.from_bytes(hashlib.sha256(b"rlm-graph store setup").digest()[:8], "big", signed=True)
"""PostgreSQL advisory lock held while a store's tables are made."""


def _lock_setup(path: Path) -> IO[str]:
    """Block until this process alone sets up the SQLite store at ``path``."""
    import fcntl

    folder = path.with_name(path.name + ".locks")
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / "setup.lock").open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _prepare_sqlite_file(path: Path) -> None:
    """Check an existing file (:func:`_check_sqlite_file`) and make its folder."""
    _check_sqlite_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"Cannot create the store's folder {path.parent}: {exc.strerror}. Pick another with --store PATH."
        raise StoreError(msg) from exc


def _check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not an SQLite database or holds another program's
    tables; nothing is written to it before this check passes."""
    if path.is_dir():
        msg = f"The store {path} is a folder; --store takes a file path (or a postgresql:// URL)."
        raise StoreError(msg)
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        magic = handle.read(len(_SQLITE_MAGIC))
    if magic != _SQLITE_MAGIC:
        msg = (
            f"{path} is not an rlm-graph store (it is not an SQLite database). "
            "Nothing was changed. Pick another file with --store PATH."
        )
        raise StoreError(msg)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        msg = f"{path} is a damaged SQLite file ({exc}). Nothing was changed. Pick another with --store PATH."
        raise StoreError(msg) from exc
    if tables and not tables & _OUR_TABLES:
        shown = ", ".join(sorted(tables)[:5])
        msg = (
            f"{path} is an SQLite database of another program (tables: {shown}), "
            "not an rlm-graph store. Nothing was changed. Pick another file with --store PATH."
        )
        raise StoreError(msg)


@contextlib.asynccontextmanager
async def _open_postgres(url: str) -> AsyncIterator[Store]:
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.store.postgres import AsyncPostgresStore

    shown = redact(url)
    try:
        lock_conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = (
            f"Cannot reach the PostgreSQL store {shown}: {redact(reason)}. "
            "Check that the server runs and the URL (host, port, database, user) is right."
        )
        raise StoreError(msg) from None
    try:
        async with (
            AsyncPostgresSaver.from_conn_string(url) as saver,
            AsyncPostgresStore.from_conn_string(url) as kv,
        ):
            store = Store(shown, saver, kv, _PostgresLocker(lock_conn))
            # One opener at a time makes the tables (see _open_sqlite).
            # Polled, not waited on: a waiting statement is an open transaction,
            # and the setup's CREATE INDEX CONCURRENTLY waits for those to end.
            while not await _pg_try_lock(lock_conn, _SETUP_LOCK_KEY):
                await asyncio.sleep(0.1)
            try:
                await saver.setup()
                await kv.setup()
                await _check_format(store)
            finally:
                await lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK_KEY,))
            yield store
    except psycopg.Error as exc:
        msg = f"The PostgreSQL store {shown} failed: {redact(str(exc).strip())}"
        raise StoreError(msg) from None
    finally:
        await lock_conn.close()


async def _check_format(store: Store) -> None:
    item = await store.kv.aget(_META, "format")
    if item is None:
        await store.kv.aput(_META, "format", {"product": PRODUCT, "format": STORE_FORMAT}, index=False)
        return
    found = item.value.get("format")
    if item.value.get("product") != PRODUCT or not isinstance(found, int):
        msg = f"{store.location} holds data that is not an rlm-graph store. Nothing was changed."
        raise StoreError(msg)
    if found > STORE_FORMAT:
        msg = (
            f"The store {store.location} was written by a newer rlm-graph (store format {found}; "
            f"this version reads format {STORE_FORMAT}). Upgrade rlm-graph, or use another "
            "store with --store. Nothing was changed."
        )
        raise StoreError(msg)


async def _search_all(kv: Any, namespace: tuple[str, ...]) -> list[Any]:
    items: list[Any] = []
    while True:
        page = await kv.asearch(namespace, limit=1000, offset=len(items))
        items.extend(i for i in page if tuple(i.namespace) == namespace)
        if len(page) < 1000:
            return items


# -- run locks ----------------------------------------------------------------


class _Locker:
    """A run lock across processes; also refuses a second holder in this process."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(self, run_id: str) -> AsyncIterator[None]:
        if run_id in self._held:
            raise _busy(run_id)
        self._held.add(run_id)
        try:
            async with self._hold(run_id):
                yield
        finally:
            self._held.discard(run_id)

    def _hold(self, run_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def is_locked(self, run_id: str) -> bool:
        return run_id in self._held


def _busy(run_id: str) -> RunBusyError:
    return RunBusyError(
        f"Run {run_id} is busy: another process is running or resuming it. "
        "Wait for it to finish, or stop that process first."
    )


class _MemoryLocker(_Locker):
    """Locks of a store that lives in one process only."""


class _FileLocker(_Locker):
    """``flock`` on ``<store>.locks/<run id>``: released when the holder dies."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._folder = path.with_name(path.name + ".locks")

    def _path(self, run_id: str) -> Path:
        return self._folder / (hashlib.sha256(run_id.encode()).hexdigest()[:24] + ".lock")

    # The file calls run in a thread, off the event loop (see _open_sqlite).

    @contextlib.asynccontextmanager
    async def _hold(self, run_id: str) -> AsyncIterator[None]:
        handle = await asyncio.to_thread(self._acquire, run_id)
        try:
            yield
        finally:
            await asyncio.to_thread(handle.close)

    def _acquire(self, run_id: str) -> IO[str]:
        import fcntl

        self._folder.mkdir(parents=True, exist_ok=True)
        handle = self._path(run_id).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise _busy(run_id) from None
        except BaseException:
            handle.close()
            raise
        return handle

    async def is_locked(self, run_id: str) -> bool:
        if await super().is_locked(run_id):
            return True
        return await asyncio.to_thread(self._is_locked_elsewhere, run_id)

    def _is_locked_elsewhere(self, run_id: str) -> bool:
        import fcntl

        path = self._path(run_id)
        if not path.exists():
            return False
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False


async def _pg_try_lock(conn: Any, key: int) -> bool:
    """Take the session advisory lock ``key`` if it is free; never waits."""
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cursor.fetchone()
    return bool(row and row[0])


PG_BUSY_GRACE_S = 5.0
"""How long a PostgreSQL run lock is tried before the run is called busy."""


class _PostgresLocker(_Locker):
    """Session advisory locks on a connection of their own."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn

    @staticmethod
    def _key(run_id: str) -> int:
        return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big", signed=True)

    @contextlib.asynccontextmanager
    async def _hold(self, run_id: str) -> AsyncIterator[None]:
        key = self._key(run_id)
        # A holder killed a moment ago keeps its lock until its server process
        # sees the connection gone: try for a few seconds before saying busy.
        deadline = time.monotonic() + PG_BUSY_GRACE_S
        while not await _pg_try_lock(self._conn, key):
            if time.monotonic() >= deadline:
                raise _busy(run_id)
            await asyncio.sleep(0.2)
        try:
            yield
        finally:
            await self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    async def is_locked(self, run_id: str) -> bool:
        cursor = await self._conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s",
            (self._key(run_id),),
        )
        row = await cursor.fetchone()
        return bool(row and row[0])


def source_files_info(source: Source, paths: Iterable[Path | None]) -> list[dict[str, Any]]:
    """Per-file identity for change detection on resume."""
    return [
        {
            "name": f.name,
            "path": str(path) if path is not None else None,
            "sha256": hashlib.sha256(source.text[f.start : f.end].encode("utf-8", "surrogatepass")).hexdigest(),
        }
        for f, path in zip(source.files, paths, strict=True)
    ]
