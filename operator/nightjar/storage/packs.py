"""Blobs in packs (format 2): how content becomes stored bytes and back.

A **blob** is one piece of plaintext (a file's bytes, or one chunk of the database dump or of
the file index) compressed with zstd (kept raw when that does not make it smaller) and, on an
encrypted storage, sealed with the pack's data key (:mod:`nightjar.storage.crypto`). Blobs are
appended to **pack** objects of about ``PACK_TARGET`` plaintext bytes, so a million small files
are a few hundred objects, not a million.

Writing is parallel with bounded memory: blobs are grouped into packs as they come; a full pack
is compressed, sealed, hashed and PUT by a worker thread while the producer (pg_dump, the file
walk) goes on; at most ``in_flight`` packs are being processed at once, so memory is about
``(in_flight + 1) * PACK_TARGET`` whatever the size of the snapshot.

Reading is parallel too: consecutive blobs of one pack are fetched with one ranged GET, several
ranges at once, opened (authenticated, decompressed, checked against their content id) on
worker threads, and handed out in order.

A :class:`ChunkRef` says where a blob is: pack key, offset, stored length, plaintext length, its
ordinal in the pack (part of its nonce) and, for dump and index chunks, its content id.

A stream's chunk list (about 1,000 references for a 1 GB dump) is itself stored as blobs: it is
cut into **list groups** where a chunk id ends a group (:func:`list_groups`, content-defined, so
a change in one part of the dump changes one group), each group a blob with its own content id,
deduplicated against the previous snapshot's groups like any chunk. A manifest lists the groups
only: what a night adds for an unchanged region of the dump is nothing, not its references.
A short stream (``LIST_INLINE_MAX`` chunks or fewer) keeps its chunks in the manifest.
"""

from __future__ import annotations

import collections
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard
from pyfastcdc import FastCDC

from nightjar.storage.crypto import KeyRing, Sealer, chunk_id
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import Lock, ObjectMissing, ObjectStore

PACK_TARGET = 16 * 1024 * 1024
PACK_MAX_BLOBS = 20_000
CODEC_RAW = 0
CODEC_ZSTD = 1
#: Content-defined chunking of streams (dump, index, large files): FastCDC 2020.
CDC_MIN = 512 * 1024
CDC_AVG = 1024 * 1024
#: restic's sizes are 512 KiB / 1 MiB / 8 MiB; on a pgbench dump FastCDC then cuts many chunks
#: at the maximum (the rows differ in a few digits), and a night's change of the newest 1 % of
#: rows re-stored 16 MB of chunks where a 4 MiB maximum re-stores 12 MB (bench: docs/benchmarks.md).
CDC_MAX = 4 * 1024 * 1024
#: The dump's first 64 KiB are a chunk of their own: pg_dump's header carries the time of the
#: dump, so without this the first chunk (the header, the TOC and up to megabytes of the first
#: table's rows) would be new every night; now only these 64 KiB are.
DUMP_HEAD = 64 * 1024
#: Files smaller than this are one blob each; larger ones are cut by CDC.
WHOLE_FILE = CDC_MAX
#: Ranged GETs while reading: join consecutive blobs of a pack up to this many bytes.
READ_SPAN = 8 * 1024 * 1024
#: A chunk list group ends after a chunk whose id's first 32 bits are 0 modulo this (so about
#: this many references a group), or after LIST_GROUP_MAX references.
LIST_GROUP_AVG = 64
LIST_GROUP_MAX = 256
#: A stream of at most this many chunks keeps its chunk list in the manifest (no extra object).
LIST_INLINE_MAX = 32


@dataclass(frozen=True)
class ChunkRef:
    pack: str
    offset: int
    stored: int
    size: int
    ordinal: int
    id: str = ""

    def to_list(self) -> list[Any]:
        out: list[Any] = [self.pack, self.offset, self.stored, self.size, self.ordinal]
        if self.id:
            out.append(self.id)
        return out

    @classmethod
    def from_list(cls, v: list[Any]) -> ChunkRef:
        try:
            return cls(str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), str(v[5]) if len(v) > 5 else "")
        except (IndexError, TypeError, ValueError) as e:
            raise IntegrityError(f"a chunk reference is malformed: {v!r}") from e

    def rebased(self, key: Callable[[str], str]) -> ChunkRef:
        return ChunkRef(key(self.pack), self.offset, self.stored, self.size, self.ordinal, self.id)


@dataclass(frozen=True)
class PackObject:
    """A written pack, for the manifest's object list."""

    key: str
    size: int
    sha256: str
    key_id: str = ""
    wrapped_key: str = ""


# --- blob encoding ------------------------------------------------------------------------------


class Codec:
    """zstd with a one-byte marker; thread-local contexts (zstd contexts are not thread-safe)."""

    def __init__(self, level: int = 3) -> None:
        self.level = level
        self._local = threading.local()

    def _c(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def _d(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, data: bytes | memoryview) -> bytes:
        if len(data) >= 64:
            packed = self._c().compress(data)
            if len(packed) + 1 < len(data):
                return bytes([CODEC_ZSTD]) + packed
        return bytes([CODEC_RAW]) + bytes(data)

    def decode(self, blob: bytes, size: int, what: str) -> bytes:
        if not blob:
            raise IntegrityError(f"{what} is empty")
        codec = blob[0]
        if codec == CODEC_RAW:
            out = blob[1:]
        elif codec == CODEC_ZSTD:
            try:
                out = self._d().decompress(blob[1:], max_output_size=size)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{what} does not decompress: {e}") from e
        else:
            raise IntegrityError(f"{what} has an unknown encoding {codec}")
        if len(out) != size:
            raise IntegrityError(f"{what} has {len(out)} bytes, expected {size}")
        return out


# --- content-defined chunking -------------------------------------------------------------------


class Chunker:
    """Push-style FastCDC: feed bytes, get whole chunks. Cut points depend only on content since
    the previous cut, so re-cutting the unfinished tail gives what one pass over the stream would.

    Each byte is copied once (the blocks are joined into one buffer per window); the chunks are
    views of that buffer, which lives as long as one of them is still waiting to be stored.
    """

    def __init__(
        self, min_size: int = CDC_MIN, avg_size: int = CDC_AVG, max_size: int = CDC_MAX, *, head: int = 0
    ) -> None:
        """``head``: the stream's first ``head`` bytes are a chunk of their own (see DUMP_HEAD)."""
        self._cdc = FastCDC(avg_size=avg_size, min_size=min_size, max_size=max_size)
        self._window = 3 * max_size
        self._parts: list[bytes] = []
        self._size = 0
        self._head = head

    def push(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        self._parts.append(bytes(data) if not isinstance(data, bytes) else data)
        self._size += len(data)
        out: list[memoryview] = []
        if self._head and self._size >= self._head:
            whole = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            out.append(memoryview(whole)[: self._head])
            rest = whole[self._head :]
            self._parts = [rest] if rest else []
            self._size = len(rest)
            self._head = 0
        if self._size < self._window:
            return out
        return out + self._cut(final=False)

    def finish(self) -> list[memoryview]:
        self._head = 0  # a stream shorter than its head is one chunk (or a few, cut by content)
        return self._cut(final=True) if self._size else []

    def _cut(self, final: bool) -> list[memoryview]:
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(data)]
        keep = cuts if final else cuts[:-1]  # the last may be cut short by the buffer's end
        view = memoryview(data)
        out = [view[o : o + n] for o, n in keep]
        consumed = keep[-1][0] + keep[-1][1] if keep else 0
        rest = data[consumed:]
        self._parts = [rest] if rest else []
        self._size = len(rest)
        return out


# --- writing ------------------------------------------------------------------------------------


class Pending:
    """A blob handed to the writer; ``result()`` is its ChunkRef once its pack is stored."""

    __slots__ = ("_future", "_index", "id")

    def __init__(self, future: Future[list[ChunkRef]], index: int, cid: str) -> None:
        self._future = future
        self._index = index
        self.id = cid

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> ChunkRef:
        return self._future.result()[self._index]


class Ready:
    """An already stored blob (reused): same interface as Pending."""

    __slots__ = ("ref",)

    def __init__(self, ref: ChunkRef) -> None:
        self.ref = ref

    @property
    def id(self) -> str:
        return self.ref.id

    def done(self) -> bool:
        return True

    def result(self) -> ChunkRef:
        return self.ref


Slot = Pending | Ready


class PackWriter:
    """Collects blobs into packs and stores each full pack in the background."""

    def __init__(
        self,
        store: ObjectStore,
        key_for: Callable[[int], str],
        keyring: KeyRing | None,
        on_pack: Callable[[PackObject], None],
        *,
        level: int = 3,
        workers: int = 2,
        in_flight: int = 2,
        pack_target: int | None = None,
    ) -> None:
        self.store = store
        self.key_for = key_for
        self.keyring = keyring
        self.on_pack = on_pack
        self.codec = Codec(level)
        self.pack_target = pack_target or PACK_TARGET
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pack")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._futures: list[Future[list[ChunkRef]]] = []
        self._n = 0
        self._blobs: list[bytes | memoryview] = []
        self._fill = 0
        self._current: Future[list[ChunkRef]] = Future()
        self._lock = threading.Lock()
        self.stored_bytes = 0
        self.plain_bytes = 0

    def add(self, data: bytes | memoryview, cid: str = "") -> Pending:
        """Queue one blob; returns its pending reference."""
        if self._blobs and (self._fill + len(data) > self.pack_target or len(self._blobs) >= PACK_MAX_BLOBS):
            self._seal_current()
        p = Pending(self._current, len(self._blobs), cid)
        self._blobs.append(data)
        self._fill += len(data)
        self.plain_bytes += len(data)
        return p

    def _seal_current(self) -> None:
        blobs, future = self._blobs, self._current
        self._blobs, self._fill, self._current = [], 0, Future()
        self._n += 1
        key = self.key_for(self._n)
        # Finished packs are dropped here (their references live on in the Pendings that still
        # need them): memory does not grow with the number of packs. The first failure stops us.
        running = []
        for f in self._futures:
            if not f.done():
                running.append(f)
            elif f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        self._futures = running
        self._slots.acquire()
        job = self._pool.submit(self._store_pack, key, blobs, future)
        self._futures.append(job)

    def _store_pack(
        self, key: str, blobs: list[bytes | memoryview], future: Future[list[ChunkRef]]
    ) -> list[ChunkRef]:
        try:
            sealer: Sealer | None = None
            kid = wrapped = ""
            if self.keyring is not None:
                dek, kid, wrapped = self.keyring.new_data_key()
                sealer = Sealer(dek)
            out = bytearray()
            refs: list[ChunkRef] = []
            for i in range(len(blobs)):
                data = blobs[i]
                blobs[i] = b""  # each plaintext is let go once sealed: memory is about one pack
                enc = self.codec.encode(data)
                stored = sealer.seal(i, enc) if sealer is not None else enc
                refs.append(ChunkRef(key, len(out), len(stored), len(data), i))
                out += stored
            del data
            body = out
            self.store.put(key, body)
            obj = PackObject(key, len(body), hashlib.sha256(body).hexdigest(), kid, wrapped)
            with self._lock:
                self.stored_bytes += len(body)
                self.on_pack(obj)
            future.set_result(refs)
            return refs
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Store the pack being filled (all queued blobs get their references)."""
        if self._blobs:
            self._seal_current()

    def close(self) -> None:
        """Store everything queued and wait; raises the first failure."""
        try:
            self.flush()
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)


class Ordered:
    """Hands out items whose blobs are stored, in the order they were queued, holding at most
    ``limit`` items (then it waits for the oldest): bounded memory, producer rarely waits."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._q: collections.deque[tuple[Any, list[Slot]]] = collections.deque()
        self._pending = 0

    @property
    def pending(self) -> int:
        return len(self._q)

    def put(self, item: Any, slots: list[Slot]) -> Iterator[tuple[Any, list[ChunkRef]]]:
        self._q.append((item, slots))
        return self._ready(wait=len(self._q) > self.limit)

    def _ready(self, wait: bool) -> Iterator[tuple[Any, list[ChunkRef]]]:
        while self._q:
            item, slots = self._q[0]
            if not wait and not all(s.done() for s in slots):
                return
            self._q.popleft()
            yield item, [s.result() for s in slots]
            wait = wait and len(self._q) > self.limit // 2

    def drain(self) -> Iterator[tuple[Any, list[ChunkRef]]]:
        while self._q:
            item, slots = self._q.popleft()
            yield item, [s.result() for s in slots]


class StreamStore:
    """A byte stream (the dump, the index) stored as deduplicated chunks.

    ``previous`` maps the content ids of the same stream in the source's previous snapshot to
    their blobs: a chunk seen there is referenced again, not stored again.
    """

    def __init__(
        self,
        writer: PackWriter,
        id_key: bytes | None,
        previous: dict[str, ChunkRef] | None = None,
        *,
        background: bool = False,
        head: int = 0,
    ) -> None:
        """``background``: content ids are computed and chunks handed to the writer on a thread
        of their own, while the producer (pg_dump's pipe) is read and cut; the stream must then
        be the writer's only producer until :meth:`finish`. ``head``: see :class:`Chunker`."""
        self.writer = writer
        self.id_key = id_key
        self.previous = previous or {}
        self.chunker = Chunker(head=head)
        self.slots: list[Slot] = []
        self.size = 0
        self.reused_bytes = 0
        self._seen: dict[str, Slot] = {}
        self._queue: queue.Queue[memoryview | None] | None = queue.Queue(maxsize=4) if background else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.size += len(data)
        for c in self.chunker.push(data):
            self._submit(c)
        return len(data)

    def _submit(self, chunk: memoryview) -> None:
        if self._queue is None:
            self._add(chunk)
            return
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chunks", daemon=True)
            self._thread.start()
        self._queue.put(chunk)

    def _run(self) -> None:
        assert self._queue is not None  # noqa: S101 - started only with a queue
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._add(chunk)
                except BaseException as e:  # handed to the producer at its next write or finish
                    self._error = e

    def stop(self) -> None:
        """End the background thread (after finish, or when the stream is abandoned)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def flush(self) -> None:
        """File-like API: chunks are cut as data arrives."""

    def _add(self, chunk: bytes | memoryview) -> None:
        cid = chunk_id(chunk, self.id_key)
        ref = self.previous.get(cid)
        if ref is not None:
            self.slots.append(Ready(ChunkRef(ref.pack, ref.offset, ref.stored, ref.size, ref.ordinal, cid)))
            self.reused_bytes += len(chunk)
            return
        seen = self._seen.get(cid)  # repeated content inside this stream is stored once
        if seen is None:
            seen = self._seen[cid] = self.writer.add(chunk, cid)
        self.slots.append(seen)

    def finish(self) -> None:
        for c in self.chunker.finish():
            self._submit(c)
        self.stop()
        if self._error is not None:
            raise self._error

    def refs(self) -> list[ChunkRef]:
        """After the writer is flushed/closed: the chunk list, in stream order."""
        return _with_ids(self.slots)

    @property
    def sha256(self) -> str:
        """A stream's own digest is not kept: every chunk is checked against its content id,
        and the chunk list is part of the (authenticated) manifest."""
        return ""


def list_groups(refs: Iterable[ChunkRef]) -> Iterator[list[ChunkRef]]:
    """A chunk list cut into groups at content-defined points: where a chunk id says so (ids are
    uniform hashes), so an inserted or changed chunk changes its own group only."""
    group: list[ChunkRef] = []
    for r in refs:
        group.append(r)
        if len(group) >= LIST_GROUP_MAX or (r.id and int(r.id[:8], 16) % LIST_GROUP_AVG == 0):
            yield group
            group = []
    if group:
        yield group


def encode_list(group: list[ChunkRef]) -> bytes:
    return json.dumps([r.to_list() for r in group], separators=(",", ":")).encode()


def decode_list(data: bytes, what: str) -> list[ChunkRef]:
    try:
        items = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"{what} is not a chunk list: {e}") from e
    if not isinstance(items, list):
        raise IntegrityError(f"{what} is not a chunk list")
    return [ChunkRef.from_list(v) for v in items]


class ListStore:
    """Stores a chunk list as list groups (see the module's docstring), reusing the groups the
    previous snapshot stored; :meth:`refs` gives the group references once the writer is done."""

    def __init__(self, writer: PackWriter, id_key: bytes | None, previous: Iterable[ChunkRef]) -> None:
        self.writer = writer
        self.id_key = id_key
        self.previous = {r.id: r for r in previous if r.id}
        self.slots: list[Slot] = []

    def store(self, refs: Iterable[ChunkRef]) -> ListStore:
        seen: dict[str, Slot] = {}
        for group in list_groups(refs):
            data = encode_list(group)
            cid = chunk_id(data, self.id_key)
            prev = self.previous.get(cid)
            if prev is not None:
                self.slots.append(Ready(prev))
                continue
            if cid not in seen:
                seen[cid] = self.writer.add(data, cid)
            self.slots.append(seen[cid])
        return self

    def refs(self) -> list[ChunkRef]:
        return _with_ids(self.slots)


def _with_ids(slots: list[Slot]) -> list[ChunkRef]:
    out = []
    for s in slots:
        r = s.result()
        out.append(r if r.id else ChunkRef(r.pack, r.offset, r.stored, r.size, r.ordinal, s.id))
    return out


def split_file(data_source: Any, size: int) -> Iterator[bytes | memoryview]:
    """A file's bytes as blobs: one blob when small, CDC chunks when large (``size`` is what was
    listed; the bytes read win)."""
    if size < WHOLE_FILE:
        parts: list[bytes] = []
        n = 0
        while n < WHOLE_FILE and (block := data_source.read(WHOLE_FILE - n)):
            parts.append(block)
            n += len(block)
        head = parts[0] if len(parts) == 1 else b"".join(parts)
        if n < WHOLE_FILE:
            yield head
            return
        data_source = _Prefixed(head, data_source)  # longer than listed: cut it by content
    chunker = Chunker()
    while block := data_source.read(4 * 1024 * 1024):
        yield from chunker.push(block)
    yield from chunker.finish()


class _Prefixed:
    def __init__(self, head: bytes, rest: Any) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        data: bytes = self.rest.read(n)
        return data


# --- reading ------------------------------------------------------------------------------------


class Opener(Protocol):
    def sealer(self, pack: str) -> Sealer | None:
        """The Sealer of a pack (None for a storage without encryption)."""


@dataclass
class _Span:
    pack: str
    start: int
    end: int
    refs: list[ChunkRef]


class BlobReader:
    """Reads blobs with parallel ranged GETs, opening and checking each, in the order asked."""

    def __init__(
        self,
        store: ObjectStore,
        opener: Opener,
        locate: Callable[[str], str] = str,
        *,
        workers: int = 4,
        ahead: int = 8,
        id_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.opener = opener
        self.locate = locate
        self.codec = Codec()
        self.workers = workers
        self.ahead = ahead
        self.id_key = id_key
        self.requests = 0

    def _spans(self, refs: Iterable[ChunkRef]) -> Iterator[_Span]:
        cur: _Span | None = None
        for r in refs:
            if (
                cur is not None
                and cur.pack == r.pack
                and cur.end == r.offset
                and cur.end - cur.start + r.stored <= READ_SPAN
            ):
                cur.end += r.stored
                cur.refs.append(r)
                continue
            if cur is not None:
                yield cur
            cur = _Span(r.pack, r.offset, r.offset + r.stored, [r])
        if cur is not None:
            yield cur

    def _fetch(self, span: _Span) -> list[bytes]:
        key = self.locate(span.pack)
        try:
            raw = self.store.read(key, span.start, span.end)
        except ObjectMissing as e:
            raise IntegrityError(f"pack {span.pack} is missing from the bucket") from e
        if len(raw) != span.end - span.start:
            raise IntegrityError(f"pack {span.pack} is truncated")
        sealer = self.opener.sealer(span.pack)
        out = []
        view = memoryview(raw)
        for r in span.refs:
            what = f"blob {r.ordinal} of pack {span.pack}"
            stored = view[r.offset - span.start : r.offset - span.start + r.stored]
            enc = sealer.open(r.ordinal, stored, what) if sealer is not None else bytes(stored)
            plain = self.codec.decode(enc, r.size, what)
            if r.id and chunk_id(plain, self.id_key) != r.id:
                raise IntegrityError(f"{what} is not the chunk the snapshot lists")
            out.append(plain)
        return out

    def read(self, refs: Iterable[ChunkRef]) -> Iterator[bytes]:
        """Every blob's plaintext, in order."""
        spans = self._spans(refs)
        queue: collections.deque[Future[list[bytes]]] = collections.deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fetch") as pool:
            try:
                for span in spans:
                    queue.append(pool.submit(self._fetch, span))
                    self.requests += 1
                    while len(queue) >= self.ahead:
                        yield from queue.popleft().result()
                while queue:
                    yield from queue.popleft().result()
            finally:
                for f in queue:
                    f.cancel()


class KeyOpener:
    """Pack sealers from the manifest's wrapped data keys and the storage's key ring (or from
    data keys handed over already unwrapped, for a restore into another namespace)."""

    def __init__(
        self,
        wrapped: dict[str, tuple[str, str]],
        keyring: KeyRing | None,
        plain_keys: dict[str, bytes] | None = None,
    ) -> None:
        self.wrapped = wrapped
        self.keyring = keyring
        self.plain_keys = plain_keys or {}
        self._cache: dict[str, Sealer] = {}
        self._lock = threading.Lock()

    def sealer(self, pack: str) -> Sealer | None:
        with self._lock:
            s = self._cache.get(pack)
            if s is not None:
                return s
            if pack in self.plain_keys:
                s = Sealer(self.plain_keys[pack])
            else:
                kid, wrapped = self.wrapped.get(pack, ("", ""))
                if not wrapped:
                    return None
                if self.keyring is None:
                    raise IntegrityError(f"pack {pack} is encrypted and no key was given")
                s = Sealer(self.keyring.unwrap(wrapped, kid))
            self._cache[pack] = s
            return s


def lock_all(store: ObjectStore, keys: Iterable[str], lock: Lock | None) -> None:
    if lock is None:
        return
    for key in keys:
        store.extend_retention(key, lock)
