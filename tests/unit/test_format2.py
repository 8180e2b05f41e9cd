"""Format 2 end to end on an in-memory store: writer → reader, compression, encryption, dedup,
tampering and key rotation."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from nightjar.agent.files import PreviousIndex, back_up_tree
from nightjar.storage import layout, packs
from nightjar.storage.crypto import KeyProblem, KeyRing, Sealer, new_key_text
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Manifest, PublicManifest
from nightjar.storage.packs import Codec
from nightjar.storage.snapshot import SnapshotReader, hand_over_data_keys, load_data_keys
from nightjar.storage.writer import SnapshotWriter
from tests.memstore import MemoryStore

MARKER = b"NIGHTJAR-SECRET-MARKER-7f3a"
EXPIRES = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def ring(*ids: str, current: str = "") -> KeyRing:
    data = {f"key-{i}": new_key_text() for i in ids}
    if current:
        data["current"] = current
    return KeyRing.from_data("app-keys", data)


def make_dump(n: int = 3_000_000, seed: int = 1, tail: bytes = b"") -> bytes:
    rnd = random.Random(seed)  # noqa: S311 - test data, not secrets
    rows = b"".join(
        b"%d\t%d\t%s\n" % (i, rnd.randrange(10**6), MARKER if i % 5000 == 0 else b"row")
        for i in range(n // 20)
    )
    return b"PGDMP" + rows[: n - 5] + tail


def make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a" / "small.txt").write_bytes(b"hello " + MARKER)
    (root / "a" / "b" / "zero").write_bytes(b"")
    big = random.Random(3).randbytes(9 * 1024 * 1024)  # noqa: S311 - test data
    (root / "a" / "b" / "big.bin").write_bytes(big)
    for i in range(50):
        (root / "a" / f"f{i:03d}").write_bytes(os.urandom(100) + MARKER)
    os.chmod(root / "a" / "small.txt", 0o600)
    os.symlink("a/small.txt", root / "link")


def take(
    store: MemoryStore,
    root: Path | None,
    dump: bytes,
    attempt: str,
    keyring: KeyRing | None,
    previous: str = "",
) -> tuple[str, str, Manifest]:
    loc = layout.SnapshotLocation("", "ns", "src", "uid-" + attempt, attempt)
    prev = SnapshotReader(store, previous, keyring=keyring) if previous else None
    w = SnapshotWriter(store, loc, keyring=keyring, previous=prev.m if prev else None)
    s = w.dump_stream()
    for i in range(0, len(dump), 1 << 20):
        s.write(dump[i : i + (1 << 20)])
    db = w.database(s, pg_dump_version="15", server_version="15", archive_version="1.14", dbname="app")
    files = None
    if root is not None:
        idx = w.index()
        entries = prev.entries() if prev is not None and w.previous is not None else None
        back_up_tree(root, idx, PreviousIndex(entries))
        files = idx.finish()
    return w.commit(
        created=dt.datetime(2026, 11, 30, tzinfo=dt.UTC),
        expires=EXPIRES,
        database=db,
        files=files,
        backup={"namespace": "ns", "name": "b", "uid": "u", "type": "OnDemand"},
        source="src",
        contents="Full",
        model_version="1.0",
    )


def slurp(stream: Any) -> bytes:
    out = bytearray()
    while data := stream.read(1 << 20):
        out += data
    return bytes(out)


def read_all(reader: SnapshotReader) -> tuple[bytes, dict[str, tuple[str, int, bytes]]]:
    dump = slurp(reader.open_dump())
    out: dict[str, tuple[str, int, bytes]] = {}
    for e, stream in reader.contents(reader.entries()):
        out[e.path] = (e.type, e.mode, slurp(stream) if stream is not None else e.target.encode())
    return dump, out


@pytest.mark.parametrize("encrypted", [False, True])
def test_round_trip(tmp_path: Path, encrypted: bool) -> None:
    store = MemoryStore()
    keys = ring("1") if encrypted else None
    make_tree(tmp_path)
    dump = make_dump()
    key, sha, m = take(store, tmp_path, dump, "a1", keys)
    assert m.format == 2
    reader = SnapshotReader(store, key, sha, keyring=keys)
    got_dump, files = read_all(reader)
    assert got_dump == dump
    assert files["a/small.txt"] == ("f", 0o600, b"hello " + MARKER)
    assert files["a/b/zero"][2] == b""
    assert files["a/b/big.bin"][2] == (tmp_path / "a/b/big.bin").read_bytes()
    assert files["link"] == ("l", 0o777, b"a/small.txt")
    assert files["empty"][0] == "d"
    assert len(reader.m.files.index.chunks) >= 1  # type: ignore[union-attr]
    # compressed: the dump is text, stored much smaller than it is
    assert store.stored_bytes() < len(dump) // 2 + 9 * 1024 * 1024 + 200_000
    raw_has_marker = any(MARKER in v for v in store.objects.values())
    assert raw_has_marker is False if encrypted else True
    if encrypted:
        assert not any(b"small.txt" in v for v in store.objects.values())


def test_unchanged_second_snapshot_stores_only_its_manifest(tmp_path: Path) -> None:
    store = MemoryStore()
    keys = ring("1")
    make_tree(tmp_path)
    dump = make_dump()
    key, _, _ = take(store, tmp_path, dump, "a1", keys)
    before = set(store.objects)
    key2, sha2, m2 = take(store, tmp_path, dump, "a2", keys, previous=key)
    new = set(store.objects) - before
    assert new == {key2}, new
    assert len(store.objects[key2]) < 200_000
    assert m2.files is not None and m2.files.reused_files == m2.files.count
    assert read_all(SnapshotReader(store, key2, sha2, keyring=keys))[0] == dump


def test_changed_tail_of_dump_stores_only_new_chunks(tmp_path: Path) -> None:
    store = MemoryStore()
    dump = make_dump(8_000_000)
    key, _, _ = take(store, None, dump, "a1", None)
    first = store.stored_bytes()
    changed = dump[:-200_000] + os.urandom(200_000)
    take(store, None, changed, "a2", None, previous=key)
    added = store.stored_bytes() - first
    assert added < 6 * 1024 * 1024, added  # a few chunks, not the whole dump


def flip(store: MemoryStore, key: str, at: int) -> None:
    data = bytearray(store.objects[key])
    data[at] ^= 0x01
    store.objects[key] = bytes(data)


@pytest.mark.parametrize("encrypted", [False, True])
def test_any_flipped_byte_fails_the_read(tmp_path: Path, encrypted: bool) -> None:
    keys = ring("1") if encrypted else None
    make_tree(tmp_path)
    pristine = MemoryStore()
    key, sha, m = take(pristine, tmp_path, make_dump(), "a1", keys)
    packs = [o.key for o in m.objects]
    for target in [*packs, key]:
        for at in (0, len(pristine.objects[target]) // 2, len(pristine.objects[target]) - 1):
            store = MemoryStore()
            store.objects = dict(pristine.objects)
            flip(store, target, at)
            with pytest.raises((IntegrityError, KeyProblem)):
                read_all(SnapshotReader(store, key, sha if target == key else "", keyring=keys))


def test_truncated_pack_and_swapped_blobs_fail(tmp_path: Path) -> None:
    keys = ring("1")
    make_tree(tmp_path)
    store = MemoryStore()
    key, sha, m = take(store, tmp_path, make_dump(), "a1", keys)
    pack = m.objects[0].key
    store.objects[pack] = store.objects[pack][: -(64 * 1024 + 16)]
    with pytest.raises(IntegrityError):
        read_all(SnapshotReader(store, key, sha, keyring=keys))
    # a segment sealed for one blob is refused at another's place
    s = Sealer(os.urandom(32))
    a = s.seal(1, b"x" * 10)
    with pytest.raises(IntegrityError):
        s.open(2, a, "blob")
    two = s.seal(0, b"y" * (64 * 1024 * 2))
    cut = two[: 64 * 1024 + 16]  # first segment only: not sealed as the last one
    with pytest.raises(IntegrityError):
        s.open(0, cut, "blob")


def test_wrong_or_missing_key_names_secret_and_id(tmp_path: Path) -> None:
    store = MemoryStore()
    key, sha, _ = take(store, None, make_dump(), "a1", ring("1"))
    with pytest.raises(IntegrityError, match=r"app-keys"):
        SnapshotReader(store, key, sha, keyring=ring("1"))  # same id, other bytes
    with pytest.raises(IntegrityError, match=r"no key id 1"):
        SnapshotReader(store, key, sha, keyring=ring("2"))
    with pytest.raises(IntegrityError, match="encrypted"):
        SnapshotReader(store, key, sha)


def test_rotation_keeps_old_snapshots_and_dedup(tmp_path: Path) -> None:
    store = MemoryStore()
    k1 = ring("1")
    make_tree(tmp_path)
    dump = make_dump()
    key1, sha1, _ = take(store, tmp_path, dump, "a1", k1)
    both = KeyRing.from_data("app-keys", {"key-1": base64.b64encode(k1.keys["1"]).decode(),
                                           "key-2": new_key_text(), "current": "2"})  # fmt: skip
    before = set(store.objects)
    key2, sha2, _ = take(store, tmp_path, dump, "a2", both, previous=key1)
    assert set(store.objects) - before == {key2}  # rotation did not break deduplication
    assert PublicManifest.parse(store.objects[key2]).key_ids() == {"1", "2"}
    assert read_all(SnapshotReader(store, key1, sha1, keyring=both))[0] == dump
    assert read_all(SnapshotReader(store, key2, sha2, keyring=both))[0] == dump
    only2 = KeyRing.from_data("app-keys", {"key-2": base64.b64encode(both.keys["2"]).decode()})
    with pytest.raises(IntegrityError, match="key id 1"):
        read_all(SnapshotReader(store, key2, sha2, keyring=only2))


def test_handed_over_data_keys_open_one_snapshot(tmp_path: Path) -> None:
    store = MemoryStore()
    keys = ring("1")
    make_tree(tmp_path)
    key, sha, _ = take(store, tmp_path, make_dump(), "a1", keys)
    handed = hand_over_data_keys(store.objects[key], keys)
    assert "1" not in handed and all(len(base64.b64decode(v)) == 32 for v in handed.values())
    reader = SnapshotReader(store, key, sha, data_keys=load_data_keys(handed))
    assert read_all(reader)[1]["a/small.txt"][2].endswith(MARKER)


def test_keyring_errors_name_the_secret_never_the_key() -> None:
    text = new_key_text()
    with pytest.raises(KeyProblem, match="no key"):
        KeyRing.from_data("k", {})
    with pytest.raises(KeyProblem, match="32 random bytes") as e:
        KeyRing.from_data("k", {"key-1": base64.b64encode(b"short").decode()})
    assert "c2hvcnQ" not in str(e.value)
    with pytest.raises(KeyProblem, match="no 'current'"):
        KeyRing.from_data("k", {"key-1": text, "key-2": new_key_text()})
    r = KeyRing.from_data("k", {"key-1": text})
    assert text not in repr(r) and r.current == "1"


def test_public_part_is_authenticated(tmp_path: Path) -> None:
    import json

    store = MemoryStore()
    keys = ring("1")
    key, _, _ = take(store, None, make_dump(), "a1", keys)
    d = json.loads(store.objects[key])
    d["expiresOn"] = "2099-01-01T00:00:00Z"
    store.objects[key] = json.dumps(d).encode()
    with pytest.raises(IntegrityError, match="public part"):
        SnapshotReader(store, key, keyring=keys)


def test_chunker_matches_one_pass() -> None:
    from nightjar.storage.packs import Chunker

    data = random.Random(5).randbytes(20 * 1024 * 1024)  # noqa: S311
    c = Chunker()
    pushed = []
    for i in range(0, len(data), 700_001):
        pushed += c.push(data[i : i + 700_001])
    pushed += c.finish()
    one = Chunker()
    whole = one.push(data) + one.finish()
    assert b"".join(pushed) == data
    assert [len(x) for x in pushed] == [len(x) for x in whole]
    io.BytesIO()  # keep io imported for readers of this test


def test_a_dumps_header_is_a_chunk_of_its_own() -> None:
    """pg_dump writes the time of the dump into its header: a night must not re-store the
    megabytes of rows that would share the first chunk with it."""
    from nightjar.storage.packs import DUMP_HEAD, Chunker

    rows = random.Random(9).randbytes(12 * 1024 * 1024)  # noqa: S311
    nights = []
    for stamp in (b"2026-11-29 01:00", b"2026-11-30 01:00"):
        c = Chunker(head=DUMP_HEAD)
        data = b"PGDMP" + stamp + rows
        chunks = []
        for i in range(0, len(data), 100_003):  # the head is cut wherever the blocks end
            chunks += [bytes(x) for x in c.push(data[i : i + 100_003])]
        chunks += [bytes(x) for x in c.finish()]
        assert b"".join(chunks) == data and len(chunks[0]) == DUMP_HEAD
        nights.append(chunks)
    assert nights[0][0] != nights[1][0]
    assert nights[0][1:] == nights[1][1:]  # everything after the header is shared
    short = Chunker(head=DUMP_HEAD)
    assert [bytes(x) for x in short.push(b"tiny") + short.finish()] == [b"tiny"]


def test_keys_status_says_which_keys_may_go() -> None:
    from collections import Counter

    from nightjar.transfer.keys import KeyStatus

    s = KeyStatus("backup-keys", ["1", "2", "3"], "3", Counter({"1": 4, "3": 2, "4": 1}))
    rows = {r[0]: r for r in s.rows()}
    assert rows["1"][1:4] == ["yes", "", "4"] and rows["1"][4] == "keep"
    assert rows["2"][4].startswith("no live snapshot needs it")
    assert rows["3"][2] == "yes" and rows["3"][4].startswith("current")
    assert rows["4"][1] == "MISSING" and "cannot be restored" in rows["4"][4]


def test_chunk_lists_are_groups_stored_once_per_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest lists the groups of the dump's chunk list, not its chunks; a night that changes
    the end of the dump stores the groups it changed and reuses the others."""
    monkeypatch.setattr(packs, "LIST_GROUP_AVG", 2)  # many groups from a small dump
    monkeypatch.setattr(packs, "LIST_INLINE_MAX", 1)
    store = MemoryStore()
    keys = ring("1")
    # Group ends depend on keyed chunk ids (a random key per source): ~20 chunks make fewer than
    # 3 groups a 1-in-25,000 event (16 MB, ~10 chunks, failed about 1 run in 50).
    dump = make_dump(32_000_000)
    key, _, m1 = take(store, None, dump, "a1", keys)
    assert m1.database is not None
    first = m1.database.dump
    assert len(first.lists) >= 3 and first.count == len(first.chunks) > len(first.lists)
    changed = dump[:-300_000] + os.urandom(300_000)
    key2, sha2, m2 = take(store, None, changed, "a2", keys, previous=key)
    assert m2.database is not None
    second = m2.database.dump
    reused = {r.id for r in first.lists} & {r.id for r in second.lists}
    assert len(reused) >= len(first.lists) - 2, (len(reused), len(first.lists))
    reader = SnapshotReader(store, key2, sha2, keyring=keys)
    assert reader.m.database is not None and reader.m.database.dump.chunks == second.chunks
    assert slurp(reader.open_dump()) == changed
    # the reused groups' packs are the second snapshot's objects too (locked and kept with it)
    assert {r.pack for r in second.lists} <= {o.key for o in m2.objects}
    # a replica (every object under another prefix) reads the lists' references relocated
    for k in [o.key for o in m2.objects] + [key2]:
        store.objects["replica/" + k] = store.objects[k]
    replica = SnapshotReader(store, "replica/" + key2, sha2, rebase=("", "replica/"), keyring=keys)
    for o in m2.objects:
        del store.objects[o.key]
    assert slurp(replica.open_dump()) == changed


def test_list_groups_are_cut_by_content() -> None:
    rnd = random.Random(7)  # noqa: S311 - test data
    refs = [packs.ChunkRef("p", i, 1, 1, i, rnd.randbytes(32).hex()) for i in range(2000)]
    before = [packs.encode_list(g) for g in packs.list_groups(refs)]
    assert 10 < len(before) < 100
    inserted = [*refs[:1000], packs.ChunkRef("q", 0, 1, 1, 0, rnd.randbytes(32).hex()), *refs[1000:]]
    after = [packs.encode_list(g) for g in packs.list_groups(inserted)]
    assert len(set(before) - set(after)) <= 2  # the group with the insertion (and the one it joins)
    assert sum(len(packs.decode_list(g, "g")) for g in after) == len(inserted)
    with pytest.raises(IntegrityError, match="not a chunk list"):
        packs.decode_list(b"{}", "a group")


def test_a_damaged_chunk_list_names_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "LIST_INLINE_MAX", 0)
    store = MemoryStore()
    key, sha, m = take(store, None, make_dump(), "a1", None)
    assert m.database is not None
    group = m.database.dump.lists[0]
    flip(store, group.pack, group.offset + group.stored // 2)
    with pytest.raises(IntegrityError, match="chunk list of the database dump"):
        SnapshotReader(store, key, sha)


def test_a_short_stream_keeps_its_chunks_in_the_manifest(tmp_path: Path) -> None:
    store = MemoryStore()
    dump = make_dump()
    key, _, m = take(store, None, dump, "a1", None)
    assert m.database is not None
    assert not m.database.dump.lists and m.database.dump.chunks  # no object for a short list
    raw = json.loads(store.objects[key])
    content = json.loads(Codec().decode(base64.b64decode(raw["contentZstd"]), raw["contentBytes"], "m"))
    assert "chunks" in content["database"] and "chunkLists" not in content["database"]
    assert slurp(SnapshotReader(store, key).open_dump()) == dump
