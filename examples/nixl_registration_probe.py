# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""What NIXL's UCX backend needs registered for memory laid out like vattn's
Host backend (a PROT_NONE reservation with memfd ranges mapped MAP_FIXED into
it, and PROT_NONE put back over a range on unmap).

Two processes: the *target* holds the memory, the *initiator* reads it with
NIXL READ. Each case prints one line, `case: result`. Run:

    UCX_TLS=... python examples/nixl_registration_probe.py

Cases:
  reserve_prot_none   register the whole reservation while all of it is
                      PROT_NONE (nothing mapped yet)
  read_after_map      then map an extent into it, write pattern A, read it
                      through the registration made before the mapping
  read_after_remap    unmap that extent, map another memfd range in its place,
                      write pattern B, read through the same registration
  read_unmapped       read a range of the registration that is PROT_NONE
  extent_register     register only a mapped extent (no reservation-wide
                      registration), read it
"""

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time

import numpy as np

PROT_NONE = 0
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
RESERVE = 64 << 20
EXTENT = 2 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]


def checked_mmap(addr, length, prot, flags, fd, offset):
    p = libc.mmap(addr, length, prot, flags, fd, offset)
    if p in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return p


def make_agent(name):
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def target(out):
    """Holds the memory; obeys one command a line on stdin."""
    agent = make_agent("target")
    fd = os.memfd_create("probe")
    os.ftruncate(fd, 4 * EXTENT)
    base = checked_mmap(None, RESERVE, PROT_NONE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    regs = {}

    def say(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    say(base=base, meta=agent.get_agent_metadata().hex())
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "register":
                regs[cmd["name"]] = agent.register_memory(
                    [(base + cmd["offset"], cmd["bytes"], 0, "")], "DRAM")
                say(ok=True, meta=agent.get_agent_metadata().hex())
            elif op == "map":  # memfd range `handle` at `offset`, filled with `fill`
                checked_mmap(base + cmd["offset"], EXTENT, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_SHARED | MAP_FIXED, fd, cmd["handle"] * EXTENT)
                ctypes.memset(base + cmd["offset"], cmd["fill"], EXTENT)
                say(ok=True)
            elif op == "unmap":
                checked_mmap(base + cmd["offset"], EXTENT, PROT_NONE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                             -1, 0)
                say(ok=True)
            elif op == "quit":
                for r in regs.values():
                    agent.deregister_memory(r)
                say(ok=True)
                break
        except Exception as e:  # noqa: BLE001 - reported to the initiator
            say(ok=False, error=f"{type(e).__name__}: {e}")
    out.flush()
    os._exit(0)  # NIXL 1.5.1 + UCX may crash in its own teardown: skip it.


def initiator():
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)

    def ask(**kw):
        proc.stdin.write(json.dumps(kw) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    hello = json.loads(proc.stdout.readline())
    base = hello["base"]
    agent = make_agent("initiator")
    local = np.zeros(EXTENT, dtype=np.uint8)
    addr = local.ctypes.data
    local_reg = agent.register_memory([(addr, EXTENT, 0, "")], "DRAM")
    local_descs = agent.get_xfer_descs([(addr, EXTENT, 0)], "DRAM")

    def read(offset, meta):
        peer = agent.add_remote_agent(bytes.fromhex(meta))
        local[:] = 0
        remote = agent.get_xfer_descs([(base + offset, EXTENT, 0)], "DRAM")
        try:
            h = agent.initialize_xfer("READ", local_descs, remote, peer)
        except Exception as e:  # noqa: BLE001
            return f"initialize_xfer failed: {type(e).__name__}: {e}"
        try:
            state = agent.transfer(h)
            deadline = time.time() + 10
            while state == "PROC" and time.time() < deadline:
                state = agent.check_xfer_state(h)
        except Exception as e:  # noqa: BLE001
            return f"transfer raised {type(e).__name__}: {e}"
        agent.release_xfer_handle(h)
        agent.remove_remote_agent(peer)
        if state != "DONE":
            return f"transfer {state}"
        values = np.unique(local)
        return f"DONE, bytes read = {values.tolist()}"

    def report(case, result):
        print(f"{case}: {result}", flush=True)

    r = ask(op="register", name="whole", offset=0, bytes=RESERVE)
    report("reserve_prot_none", "registered" if r["ok"] else r["error"])
    meta = r["meta"] if r["ok"] else None
    if r["ok"]:
        meta = r["meta"]
        ask(op="map", offset=0, handle=0, fill=0xA1)
        report("read_after_map", read(0, meta) + " (pattern A = 161)")
        ask(op="unmap", offset=0)
        ask(op="map", offset=0, handle=1, fill=0xB2)
        report("read_after_remap", read(0, meta) + " (pattern B = 178)")
    ask(op="map", offset=16 * EXTENT, handle=2, fill=0xC3)
    r = ask(op="register", name="extent", offset=16 * EXTENT, bytes=EXTENT)
    report("extent_register",
           (read(16 * EXTENT, r["meta"]) + " (pattern C = 195)") if r["ok"] else r["error"])
    # Last: a failed read may break the connection (or the target).
    if meta is not None:
        report("read_unmapped", read(8 * EXTENT, meta))
    try:
        ask(op="quit")
        proc.wait(timeout=30)
    except Exception as e:  # noqa: BLE001
        report("target", f"gone ({type(e).__name__})")
    proc.wait(timeout=30)
    report("target_exit", proc.returncode)
    agent.deregister_memory(local_reg)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    if "--target" in sys.argv:
        # The protocol keeps the real stdout; anything else NIXL or UCX print
        # goes to stderr.
        proto = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        target(proto)
    else:
        initiator()
