# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Prefill -> decode KV handoff through NVIDIA NIXL, two processes, each with
its own vattn cache (Host backend, the same shape).

    python examples/nixl_handoff.py                   # both roles, one command
    python examples/nixl_handoff.py --layout layer-major --prompts 100,3000

What happens:
  prefill  makes a cache, registers its whole reservation with NIXL once (the
           Host backend's addresses never move; see README, "Scale-out"),
           listens on 127.0.0.1 and sends its NIXL metadata to decode. For
           each request it allocates a slot, grows it to the prompt, writes
           the prompt's K/V (a deterministic pattern per request, layer, K/V,
           token, head and dim), and sends the slot's ranges
           (cache.slot_ranges: 1 in token-major, 2 x layers in layer-major).
           It frees the slot only when decode reports the transfer done.
  decode   makes its own cache and agent, loads prefill's metadata, and per
           request allocates a slot, grows it to the prompt, pulls the KV
           with one NIXL READ over the matching ranges, checks every byte
           against the pattern, then keeps decoding: `--decode-tokens` steps
           that each write one new token, after which the prompt's bytes are
           checked again.

Control messages (JSON lines) go over a TCP socket on 127.0.0.1; the KV goes
through NIXL (UCX; keep it on this machine: UCX_TLS=shm,self or tcp,self,
UCX_NET_DEVICES=lo, set by default here).

Each role writes its verdict (JSON) to --verdict and flushes it before NIXL
is torn down: NIXL 1.5.1's UCX agent can crash at interpreter exit on its own,
so a caller reads the verdict, not only the exit code. vattn's teardown is
checked explicitly before that: every slot freed, the memory deregistered,
the cache closed, and its reservation and memfd gone from the process.
"""

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("UCX_TLS", "shm,self")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

import torch  # noqa: E402

import vattn  # noqa: E402

SHAPE = dict(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16)


def pattern(req, layer, kv, first, tokens, heads, dim):
    """K (kv=0) or V (kv=1) of tokens [first, first + tokens) of request
    `req` in layer `layer`: integers below 2048, exact in float16."""
    n = torch.arange(first * heads * dim, (first + tokens) * heads * dim, dtype=torch.int64)
    salt = req * 7919 + layer * 131 + kv * 17
    return ((n * 31 + salt) % 2039).to(torch.float16).view(tokens, heads, dim)


def write_tokens(cache, slot, req, first, tokens):
    o = cache.options
    for layer in range(cache.num_layers):
        for kv, view in ((0, cache.k), (1, cache.v)):
            t = torch.from_dlpack(view(layer, slot))
            t[first:first + tokens] = pattern(req, layer, kv, first, tokens,
                                              o["num_kv_heads"], o["head_dim"])


def mismatches(cache, slot, req, first, tokens):
    """Elements of tokens [first, first + tokens) that differ from the pattern."""
    o = cache.options
    bad = 0
    for layer in range(cache.num_layers):
        for kv, view in ((0, cache.k), (1, cache.v)):
            t = torch.from_dlpack(view(layer, slot))[first:first + tokens]
            want = pattern(req, layer, kv, first, tokens, o["num_kv_heads"], o["head_dim"])
            bad += int((t.view(torch.int16) != want.view(torch.int16)).sum())
    return bad


def make_agent(name):
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    # "none": UCX's shm transports have no peer error handling.
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def register_reservation(agent, cache):
    base, size = cache.reservation()
    return agent.register_memory([(base, size, 0, "")], "DRAM")


class Lines:
    """JSON lines over a connected socket."""

    def __init__(self, sock):
        self.sock = sock
        self.file = sock.makefile("r")

    def send(self, **msg):
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def recv(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("peer closed the control socket")
        return json.loads(line)


def vattn_is_gone(base):
    """True when no mapping of the reservation at `base` and no vattn memfd
    is left in this process (the cache and its backend are torn down)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for line in maps.splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= base < hi or "vattn-host" in line:
            return False
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "vattn-host" in os.readlink(f"/proc/self/fd/{fd}"):
                return False
        except OSError:
            pass
    return True


def write_verdict(path, verdict):
    with open(path, "w") as f:
        json.dump(verdict, f)
        f.flush()
        os.fsync(f.fileno())


def close_cache(cache, agent, reg, verdict):
    """vattn's own teardown, checked, before NIXL goes."""
    stats = cache.stats()
    verdict["active_slots_at_end"] = stats.active_slots
    agent.deregister_memory(reg)
    base, _ = cache.reservation()
    verdict["vattn_present_before_close"] = not vattn_is_gone(base)  # The check can fail.
    backend = cache.backend
    cache.close()
    del cache, backend
    gc.collect()
    verdict["vattn_teardown_ok"] = vattn_is_gone(base)


def run_prefill(args):
    verdict = {"role": "prefill", "ok": False}
    cache = vattn.Cache(vattn.HostBackend(), layout=args.layout, max_slots=args.slots,
                        max_tokens=args.max_tokens, **SHAPE)
    agent = make_agent("prefill")
    reg = register_reservation(agent, cache)
    server = socket.create_server(("127.0.0.1", args.port))
    with open(args.port_file, "w") as f:
        f.write(str(server.getsockname()[1]))
    conn, _ = server.accept()
    ctl = Lines(conn)
    ctl.send(meta=agent.get_agent_metadata().hex())
    prompts = [int(p) for p in args.prompts.split(",")]
    slots = {}
    freed_after_done = 0
    for req, tokens in enumerate(prompts):
        slot = cache.alloc_slot(tokens)
        cache.grow(slot, tokens)
        write_tokens(cache, slot, req, 0, tokens)
        if req == args.corrupt_request:  # For tests: decode must notice.
            torch.from_dlpack(cache.v(cache.num_layers - 1, slot))[tokens - 1, 0, 0] += 1
        slots[req] = slot
        ctl.send(req=req, tokens=tokens, ranges=cache.slot_ranges(slot, tokens))
    while slots:
        msg = ctl.recv()
        req = msg["done"]
        # The transfer is complete: only now may the memory go.
        cache.free(slots.pop(req))
        freed_after_done += 1
    ctl.send(bye=True)
    conn.close()
    server.close()
    verdict.update(requests=len(prompts), freed_after_done=freed_after_done)
    close_cache(cache, agent, reg, verdict)
    verdict["ok"] = (verdict["vattn_teardown_ok"] and verdict["vattn_present_before_close"]
                     and verdict["active_slots_at_end"] == 0)
    write_verdict(args.verdict, verdict)
    del agent, reg
    gc.collect()


def pull(agent, peer, local, remote):
    """One NIXL READ of the remote ranges into the local ones; seconds."""
    local_descs = agent.get_xfer_descs([(a, n, 0) for a, n in local], "DRAM")
    remote_descs = agent.get_xfer_descs([(a, n, 0) for a, n in remote], "DRAM")
    start = time.perf_counter()
    handle = agent.initialize_xfer("READ", local_descs, remote_descs, peer)
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    elapsed = time.perf_counter() - start
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL READ ended in state {state}")
    return elapsed


def run_decode(args):
    verdict = {"role": "decode", "ok": False, "requests": []}
    cache = vattn.Cache(vattn.HostBackend(), layout=args.layout, max_slots=args.slots,
                        max_tokens=args.max_tokens, **SHAPE)
    agent = make_agent("decode")
    reg = register_reservation(agent, cache)
    deadline = time.time() + 60
    while True:
        try:
            with open(args.port_file) as f:
                port = int(f.read())
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except (OSError, ValueError):
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    ctl = Lines(sock)
    peer = agent.add_remote_agent(bytes.fromhex(ctl.recv()["meta"]))
    prompts = [int(p) for p in args.prompts.split(",")]
    all_ok = True
    for _ in prompts:
        msg = ctl.recv()
        req, tokens, remote = msg["req"], msg["tokens"], msg["ranges"]
        slot = cache.alloc_slot(tokens + args.decode_tokens)
        cache.grow(slot, tokens)
        local = cache.slot_ranges(slot, tokens)
        assert [n for _, n in local] == [n for _, n in remote], "the two caches disagree"
        seconds = pull(agent, peer, local, remote)
        bad = mismatches(cache, slot, req, 0, tokens)
        ctl.send(done=req)
        # Keep decoding on the pulled KV: one new token a step.
        for step in range(args.decode_tokens):
            cache.step([(slot, tokens + step + 1)])
            write_tokens(cache, slot, req, tokens + step, 1)
        bad_after = mismatches(cache, slot, req, 0, tokens + args.decode_tokens)
        record = dict(req=req, tokens=tokens, descriptors=len(local), seconds=seconds,
                      bytes=sum(n for _, n in local), mismatches=bad,
                      mismatches_after_decode=bad_after)
        print(json.dumps(record), flush=True)
        verdict["requests"].append(record)
        all_ok = all_ok and bad == 0 and bad_after == 0
        cache.free(slot)
    assert ctl.recv().get("bye")
    sock.close()
    agent.remove_remote_agent(peer)
    close_cache(cache, agent, reg, verdict)
    verdict["ok"] = (all_ok and len(verdict["requests"]) == len(prompts)
                     and verdict["vattn_teardown_ok"] and verdict["vattn_present_before_close"]
                     and verdict["active_slots_at_end"] == 0)
    write_verdict(args.verdict, verdict)
    del agent, reg
    gc.collect()


def run_both(args):
    """Starts prefill and decode as two processes and reads their verdicts.
    A role's non-zero exit after a complete verdict is NIXL's own teardown
    (reported, not hidden); a missing or failed verdict fails the run."""
    work = args.workdir or os.path.join("/tmp", f"vattn-nixl-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    port_file = os.path.join(work, "port")
    if os.path.exists(port_file):
        os.remove(port_file)
    common = [sys.executable, os.path.abspath(__file__), "--layout", args.layout,
              "--prompts", args.prompts, "--decode-tokens", str(args.decode_tokens),
              "--slots", str(args.slots), "--max-tokens", str(args.max_tokens),
              "--corrupt-request", str(args.corrupt_request), "--port-file", port_file]
    procs = {}
    for role in ("prefill", "decode"):
        verdict = os.path.join(work, f"{role}.json")
        if os.path.exists(verdict):
            os.remove(verdict)
        procs[role] = (subprocess.Popen(common + ["--role", role, "--verdict", verdict]), verdict)
    ok = True
    for role, (proc, verdict_path) in procs.items():
        rc = proc.wait(timeout=args.timeout)
        try:
            with open(verdict_path) as f:
                verdict = json.load(f)
        except (OSError, ValueError):
            print(f"{role}: no verdict (exit code {rc}): it failed before its checks ended")
            ok = False
            continue
        print(f"{role}: verdict {'ok' if verdict['ok'] else 'FAILED'}: {json.dumps(verdict)}")
        if rc != 0:
            print(f"{role}: exit code {rc} after a complete verdict "
                  "(NIXL/UCX teardown at interpreter exit; vattn was already torn down)")
        ok = ok and verdict["ok"]
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=["both", "prefill", "decode"], default="both")
    p.add_argument("--layout", choices=["token-major", "layer-major"], default="token-major")
    p.add_argument("--prompts", default="100,1000,3000", help="prompt lengths, one request each")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--port", type=int, default=0, help="prefill's control port (0: any)")
    p.add_argument("--port-file", default=None, help="where prefill writes its port")
    p.add_argument("--verdict", default=None, help="a role's verdict file (JSON)")
    p.add_argument("--workdir", default=None, help="both: where verdicts and the port go")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--corrupt-request", type=int, default=-1,
                   help="prefill changes one element of this request after writing it "
                        "(tests that decode's check fails)")
    args = p.parse_args()
    if args.role == "both":
        sys.exit(run_both(args))
    if args.port_file is None or args.verdict is None:
        p.error("--role prefill/decode needs --port-file and --verdict")
    (run_prefill if args.role == "prefill" else run_decode)(args)


if __name__ == "__main__":
    main()
