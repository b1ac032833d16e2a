# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Zero-copy handoff between two processes on the Host backend:
vattn.send_slot(sock, cache, slot, tokens) in a prefill process,
slot = vattn.receive_slot(sock, cache) in a decode process (a subprocess
here, over socket.socketpair(AF_UNIX)). Checked: every byte equal through
decode's torch views; nothing copied (decode's physical_bytes do not grow by
the prompt; imported_bytes say what it maps); decode grows past the prompt
with its own memory; prefill frees first and decode still reads; once both
let go, the exported memory is in neither process's /proc/<pid>/fd nor
maps; prefill's next requests never get the exported memory. Bad input
(another shape, a closed socket, foreign descriptors, a truncated message,
no free slot) raises a clear error and leaves descriptors and stats as they
were."""

import gc
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import vattn

GRANULE = 64 << 10
SHAPE = dict(num_layers=3, num_kv_heads=2, head_dim=16, dtype=torch.float32,
             max_slots=4, max_tokens=2048)
PROMPT = 700  # 700 x 3 layers x 2 x 2 x 16 x 4 bytes: several granules.
HERE = os.path.dirname(os.path.abspath(__file__))


def make_cache(exportable, layout="token-major", **overrides):
    backend = vattn.HostBackend(granularity=GRANULE, exportable_handles=exportable)
    return vattn.Cache(**dict(SHAPE, layout=layout, backend=backend, **overrides))


def pattern(layer, kv, tokens, salt):
    """A value unique to (layer, K or V, token, head, dim), per salt."""
    t = torch.arange(tokens * 2 * 16, dtype=torch.float32).reshape(tokens, 2, 16)
    return t * 0.5 + layer * 100000 + kv * 50000 + salt * 1000000


def write(cache, slot, tokens, salt):
    for layer in range(cache.num_layers):
        for kv, view in ((0, cache.k), (1, cache.v)):
            torch.from_dlpack(view(layer, slot))[:tokens].copy_(pattern(layer, kv, tokens, salt))


def mismatches(cache, slot, tokens, salt):
    bad = 0
    for layer in range(cache.num_layers):
        for kv, view in ((0, cache.k), (1, cache.v)):
            got = torch.from_dlpack(view(layer, slot))[:tokens]
            bad += int((got != pattern(layer, kv, tokens, salt)).sum())
    return bad


def fd_count():
    # Collect first: a socket or file an earlier test dropped without closing
    # is closed by the garbage collector whenever it next runs, which would
    # otherwise read as this test's descriptors changing.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def inodes_at(ranges, pid="self"):
    """Inodes of the files mapped over `ranges` [(address, nbytes)]."""
    out = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inode = int(fields[4])
            if inode and any(lo < a + n and hi > a for a, n in ranges):
                out.add(inode)
    return out


def open_inodes(pid="self"):
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.stat(f"/proc/{pid}/fd/{name}").st_ino)
        except OSError:
            pass
    return out


def mapped_inodes(pid="self"):
    with open(f"/proc/{pid}/maps") as maps:
        return {int(line.split()[4]) for line in maps if int(line.split()[4])}


# The decode process: receives the slot, reports over the socket (one JSON
# line per step), waits for prefill's go-ahead between steps.
DECODE = textwrap.dedent(r"""
    import json, os, socket, sys
    sys.path.insert(0, HERE)
    import torch, vattn
    import test_slot_export as t

    sock = socket.socket(fileno=int(sys.argv[1]))
    reader = sock.makefile("r")
    def say(**kw):
        sock.sendall((json.dumps(kw) + "\n").encode())
    def hear():
        return json.loads(reader.readline())

    cache = t.make_cache(exportable=False, layout=sys.argv[2])
    before = cache.stats()
    slot = vattn.receive_slot(sock, cache)
    s = cache.stats()
    say(slot=slot, length=cache.slot_info(slot).length,
        mismatches=t.mismatches(cache, slot, t.PROMPT, 1),
        physical_before=before.physical_bytes, physical=s.physical_bytes,
        imported=s.imported_bytes, imported_slots=s.imported_slots,
        create_calls=s.create_calls, ranges=cache.slot_ranges(slot, t.PROMPT),
        backend_imported=cache.backend.counters()["imported_bytes"])
    hear()  # Prefill has freed its slot and reused its memory elsewhere.
    after_free = t.mismatches(cache, slot, t.PROMPT, 1)
    info = cache.slot_info(slot)
    cache.grow(slot, info.backed_tokens + 300)
    grown = cache.stats()
    say(after_free=after_free, after_grow=t.mismatches(cache, slot, t.PROMPT, 1),
        physical_grown=grown.physical_bytes, imported_grown=grown.imported_bytes)
    cache.free(slot)
    s = cache.stats()
    say(imported_after_free=s.imported_bytes,
        backend_imported_after_free=cache.backend.counters()["imported_bytes"])
    hear()  # Prefill has checked this process's descriptors and maps.
    cache.close()
    say(done=True)
""").replace("HERE", repr(HERE))


@pytest.mark.parametrize("layout", ["token-major", "layer-major"])
def test_two_processes_hand_off_a_slot_without_a_copy(layout):
    prefill = make_cache(exportable=True, layout=layout)
    slot = prefill.alloc_slot(PROMPT)
    prefill.grow(slot, PROMPT)
    write(prefill, slot, PROMPT, salt=1)
    exported = inodes_at(prefill.slot_ranges(slot, PROMPT))
    assert exported, "the slot's memory is mapped from memfds"

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = subprocess.Popen([sys.executable, "-c", DECODE, str(theirs.fileno()), layout],
                             pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
    theirs.close()
    reader = mine.makefile("r")

    def hear():
        line = reader.readline()
        assert line, "decode died: " + child.stderr.read()
        return json.loads(line)

    def say(**kw):
        mine.sendall((json.dumps(kw) + "\n").encode())

    try:
        vattn.send_slot(mine, prefill, slot, PROMPT)
        got = hear()
        imported = got["imported"]
        s = prefill.stats()
        assert got["length"] == PROMPT
        assert got["mismatches"] == 0
        # Zero bytes copied: decode created nothing, it maps prefill's memory.
        assert got["physical"] == got["physical_before"] == 0
        assert got["create_calls"] == 0
        assert got["imported"] >= PROMPT * prefill.bytes_per_token
        assert got["imported"] == s.exported_bytes == got["backend_imported"]
        assert got["imported_slots"] == 1 and s.exported_slots == 1
        # Decode maps the very files prefill maps.
        assert inodes_at([tuple(r) for r in got["ranges"]], child.pid) == exported

        # Prefill lets go first; its exported memory is destroyed, not pooled.
        prefill.free(slot)
        s = prefill.stats()
        assert s.exported_bytes == 0
        assert not exported & open_inodes() and not exported & mapped_inodes()
        # Its next requests get other memory (written with another pattern).
        others = []
        for salt in range(2, 2 + SHAPE["max_slots"]):
            other = prefill.alloc_slot(PROMPT)
            prefill.grow(other, PROMPT)
            write(prefill, other, PROMPT, salt=salt)
            assert not inodes_at(prefill.slot_ranges(other, PROMPT)) & exported
            others.append(other)
        say(go=True)
        got = hear()
        assert got["after_free"] == 0 and got["after_grow"] == 0
        assert got["physical_grown"] > 0  # Its own extents past the prompt.
        assert got["imported_grown"] == imported  # Growth is decode's own.
        got = hear()
        assert got["imported_after_free"] == 0 and got["backend_imported_after_free"] == 0
        # Both have let go: the exported memory is open or mapped nowhere.
        for pid in ("self", child.pid):
            assert not exported & open_inodes(pid), pid
            assert not exported & mapped_inodes(pid), pid
        assert not any("vattn-export" in os.readlink(f"/proc/{child.pid}/fd/{n}")
                       for n in os.listdir(f"/proc/{child.pid}/fd"))
        say(go=True)
        assert hear()["done"]
        for other in others:
            prefill.free(other)
    finally:
        mine.close()
        child.wait(timeout=60)
    assert child.returncode == 0, child.stderr.read()
    prefill.close()


# ---- Bad input, in one process (descriptors cross it all the same) ----------

def snapshot(cache):
    s = cache.stats()
    return (fd_count(), s.physical_bytes, s.imported_bytes, s.mapped_bytes, s.active_slots,
            cache.backend.counters()["handles"])


@pytest.fixture
def exporter():
    cache = make_cache(exportable=True)
    slot = cache.alloc_slot(300)
    cache.grow(slot, 300)
    write(cache, slot, 300, salt=5)
    yield cache, slot
    cache.close()


def test_another_shape_is_refused_naming_both(exporter):
    cache, slot = exporter
    wrong = make_cache(exportable=False, layout="layer-major")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = snapshot(wrong)
    vattn.send_slot(a, cache, slot, 300)
    with pytest.raises(vattn.InvalidArgumentError) as e:
        vattn.receive_slot(b, wrong)
    assert "token-major" in str(e.value) and "layer-major" in str(e.value)
    assert snapshot(wrong) == before
    a.close(), b.close()


def test_no_free_slot_is_resource_exhausted(exporter):
    cache, slot = exporter
    full = make_cache(exportable=False)
    for _ in range(SHAPE["max_slots"]):
        full.alloc_slot(1)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = snapshot(full)
    vattn.send_slot(a, cache, slot, 300)
    with pytest.raises(vattn.ResourceExhaustedError, match="all 4 slots are active"):
        vattn.receive_slot(b, full)
    assert snapshot(full) == before
    a.close(), b.close()


def test_a_closed_socket_is_refused_naming_it(exporter):
    cache, slot = exporter
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = b.fileno()
    b.close()
    before = snapshot(cache)
    with pytest.raises(vattn.InvalidArgumentError, match=f"descriptor {fd} is not a socket"):
        vattn.receive_slot(fd, cache)
    with pytest.raises(vattn.InvalidArgumentError, match="descriptor -1 is not a socket"):
        vattn.send_slot(b, cache, slot, 300)
    assert snapshot(cache) == before
    assert cache.stats().exported_slots == 0
    a.close()


def header(tokens, extents, regions=1, **shape):
    """A version-1 wire header (see src/slot_export.cc) for SHAPE."""
    dtype_codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
    return b"VATTNSLT" + struct.pack(
        "<IIIIIIIIQQQ", 1, 64, SHAPE["num_layers"], SHAPE["num_kv_heads"], SHAPE["head_dim"],
        dtype_codes[SHAPE["dtype"]], 0, regions, GRANULE, tokens, len(extents)) + b"".join(
            struct.pack("<QQ", off, n) for off, n in extents)


def chunk(count):
    return struct.pack("<II", 0x31444656, count)


@pytest.mark.parametrize("foreign", ["file", "memfd", "socket"])
def test_a_foreign_descriptor_is_refused(tmp_path, foreign):
    decode = make_cache(exportable=False)
    if foreign == "file":
        path = tmp_path / "plain"
        path.write_bytes(b"\0" * GRANULE)
        fd = os.open(path, os.O_RDONLY)
    elif foreign == "memfd":
        fd = os.memfd_create("someone-else")
        os.ftruncate(fd, GRANULE)
    else:
        pair = socket.socketpair()
        fd = os.dup(pair[0].fileno())
        pair[0].close(), pair[1].close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = snapshot(decode)
    a.sendall(header(50, [(0, GRANULE)]))
    socket.send_fds(a, [chunk(1)], [fd])
    with pytest.raises(vattn.InvalidArgumentError, match="not a vattn export"):
        vattn.receive_slot(b, decode)
    assert snapshot(decode) == before
    os.close(fd)
    a.close(), b.close()


@pytest.mark.parametrize("cut", [8, 64, 80])
def test_a_truncated_message_is_data_loss(exporter, cut):
    cache, slot = exporter
    decode = make_cache(exportable=False)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    message = header(300, [(0, 3 * GRANULE)]) + chunk(1)
    a.sendall(message[:cut])
    a.close()
    before = snapshot(decode)
    with pytest.raises(vattn.DataLossError, match="cut short"):
        vattn.receive_slot(b, decode)
    assert snapshot(decode) == before
    b.close()


def test_a_message_that_is_not_an_export_is_refused():
    decode = make_cache(exportable=False)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = snapshot(decode)
    a.sendall(b"GET / HTTP/1.1\r\n" * 4)
    with pytest.raises(vattn.InvalidArgumentError, match="not send a vattn slot export"):
        vattn.receive_slot(b, decode)
    assert snapshot(decode) == before
    a.close(), b.close()


def test_exporting_needs_an_exportable_backend():
    plain = make_cache(exportable=False)
    slot = plain.alloc_slot(10)
    plain.grow(slot, 10)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = fd_count()
    with pytest.raises(vattn.FailedPreconditionError, match="exportable_handles"):
        vattn.send_slot(a, plain, slot, 10)
    exporter = make_cache(exportable=True)
    exporter.grow(exporter.alloc_slot(10), 10)
    before = fd_count()
    with pytest.raises(vattn.OutOfRangeError, match="backs"):
        vattn.send_slot(a, exporter, 0, 2000)
    assert fd_count() == before
    assert exporter.stats().exported_slots == 0
    a.close(), b.close()


def test_send_and_receive_are_documented():
    assert "receive_slot" in vattn.send_slot.__doc__
    assert "same shape" in vattn.receive_slot.__doc__
    assert vattn.HostBackend(exportable_handles=True).exportable
    assert not vattn.HostBackend().exportable
