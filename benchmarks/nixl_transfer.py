# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Prefill -> decode KV transfer through NIXL: time and descriptor count per
request size, for three layouts measured in the same run:

  token-major  a vattn token-major cache: 1 descriptor per request
  layer-major  a vattn layer-major cache: 2 x layers descriptors
  paged        a paged pool (vLLM's layout: per layer K and V blocks of 16
               tokens, [2 x layers][blocks][16][heads][dim]) with each side's
               blocks taken at random from its pool: 2 x layers x blocks
               descriptors

Two processes (the target holds the prompt, the initiator pulls it with one
NIXL READ per request), UCX kept on this machine (UCX_TLS=shm,self: CMA;
UCX_NET_DEVICES=lo). Each side registers its memory with NIXL once (vattn:
cache.reservation(); paged: the pool). A timed transfer is
initialize_xfer (NIXL checks and prepares every descriptor) plus post until
DONE. Sizes are repeated --repeats times, the layouts interleaved in a
rotating order; the first transfer of every layout at every size is checked
byte for byte and not timed. Memory is warm on both sides, as in a running
engine: the paged pool is touched up front, and each vattn cache reuses its
one slot (freed slots keep their memory mapped), whose pages the untimed
first transfer of each size has faulted in.

    python benchmarks/nixl_transfer.py                      # Llama-3-8B / TP 4
    python benchmarks/nixl_transfer.py --heads 8 --sizes 256,1024,4096

The default shape is one rank's share of Llama-3-8B at tensor parallelism 4
(32 layers, 2 of its 8 KV heads, head_dim 128, fp16: 32 KiB per token): the
descriptor counts are those of the full model, the bytes a quarter, so 16k
tokens fit here. Prints a Markdown table (median of the repeats, min-max), with a memcpy of
the same bytes between two warm local buffers as the floor.
"""

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("UCX_TLS", "shm,self")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vattn  # noqa: E402

LAYOUTS = ["token-major", "layer-major", "paged"]
BLOCK = 16


class Side:
    """One process's memory: two vattn caches and a paged pool, registered
    with NIXL once."""

    def __init__(self, args, agent, seed):
        self.args = args
        self.row = args.heads * args.head_dim * 2  # fp16 bytes per token per tensor
        shape = dict(num_layers=args.layers, num_kv_heads=args.heads, head_dim=args.head_dim,
                     dtype=torch.float16, max_slots=1, max_tokens=args.max_tokens)
        self.caches = {lay: vattn.Cache(vattn.HostBackend(), layout=lay, **shape)
                       for lay in ("token-major", "layer-major")}
        self.blocks = args.max_tokens // BLOCK
        self.pool = np.zeros((2 * args.layers, self.blocks, BLOCK * self.row), dtype=np.uint8)
        self.pool.fill(1)  # Every page present, as in a running engine.
        self.rng = np.random.default_rng(seed)
        self.regs = [agent.register_memory([(*c.reservation(), 0, "")], "DRAM")
                     for c in self.caches.values()]
        self.regs.append(agent.register_memory(
            [(self.pool.ctypes.data, self.pool.nbytes, 0, "")], "DRAM"))
        self.slot = None
        self.table = None

    def prepare(self, layout, tokens):
        """Backs a request of `tokens` and returns its descriptors as an Nx3
        array (address, bytes, device 0), in the order both sides agree on."""
        if layout == "paged":
            nblocks = -(-tokens // BLOCK)
            self.table = self.rng.choice(self.blocks, nblocks, replace=False)
            base = self.pool.ctypes.data
            tensor = np.arange(2 * self.args.layers)[:, None]
            addr = base + (tensor * self.blocks + self.table[None, :]) * BLOCK * self.row
            size = np.full(addr.shape, BLOCK * self.row)
            size[:, -1] = (tokens - (nblocks - 1) * BLOCK) * self.row
            return np.stack([addr.ravel(), size.ravel(), np.zeros(addr.size, np.int64)], axis=1)
        cache = self.caches[layout]
        self.slot = cache.alloc_slot(tokens)
        cache.grow(self.slot, tokens)
        ranges = cache.slot_ranges(self.slot, tokens)
        return np.array([(a, n, 0) for a, n in ranges], dtype=np.int64)

    def fill(self, descs, seed):
        """Writes a pattern into the request's bytes; returns it."""
        data = np.random.default_rng(seed).integers(0, 255, int(descs[:, 1].sum()), np.uint8)
        at = 0
        for addr, n, _ in descs:
            np.ctypeslib.as_array((ctypes.c_uint8 * int(n)).from_address(int(addr)))[:] = \
                data[at:at + n]
            at += n
        return data

    def read(self, descs):
        return np.concatenate([
            np.ctypeslib.as_array((ctypes.c_uint8 * int(n)).from_address(int(a))).copy()
            for a, n, _ in descs])

    def release(self, layout):
        if layout != "paged":
            self.caches[layout].free(self.slot)
            self.slot = None

    def close(self, agent):
        for r in self.regs:
            agent.deregister_memory(r)
        for c in self.caches.values():
            c.close()


def make_agent(name):
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def send(sock, **msg):
    sock.sendall((json.dumps(msg) + "\n").encode())


def target(args):
    """Holds prompts; answers `prepare`, `release` and `quit` on the socket."""
    agent = make_agent("target")
    side = Side(args, agent, seed=1)
    server = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {server.getsockname()[1]}", flush=True)
    conn, _ = server.accept()
    lines = conn.makefile("r")
    send(conn, meta=agent.get_agent_metadata().hex())
    for line in lines:
        msg = json.loads(line)
        if msg["op"] == "prepare":
            descs = side.prepare(msg["layout"], msg["tokens"])
            if msg["fill"]:
                side.fill(descs, msg["seed"])
            send(conn, descs=descs.tolist())
        elif msg["op"] == "release":
            side.release(msg["layout"])
            send(conn, ok=True)
        elif msg["op"] == "quit":
            break
    side.close(agent)
    send(conn, ok=True)
    conn.close()
    sys.stdout.flush()
    os._exit(0)  # NIXL 1.5.1's UCX teardown can crash at exit; vattn is closed.


def initiator(args):
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--target"] + sys.argv[1:],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("PORT "):  # NIXL logs to stdout too.
        line = proc.stdout.readline()
    port = int(line.split()[1])
    sock = socket.create_connection(("127.0.0.1", port))
    lines = sock.makefile("r")

    def ask(**msg):
        send(sock, **msg)
        return json.loads(lines.readline())

    agent = make_agent("initiator")
    side = Side(args, agent, seed=2)
    peer = agent.add_remote_agent(bytes.fromhex(json.loads(lines.readline())["meta"]))
    sizes = [int(s) for s in args.sizes.split(",")]
    # The floor, in the same run: one memmove of the request's bytes between
    # two warm local buffers.
    row_bytes = args.layers * 2 * args.heads * args.head_dim * 2
    copy_src = np.ones(max(sizes) * row_bytes, np.uint8)
    copy_dst = np.ones(max(sizes) * row_bytes, np.uint8)
    results = {}  # (tokens, layout) -> list of (seconds, prep seconds, descriptors)
    for tokens in sizes:
        for rep in range(args.repeats + 1):  # The first round checks, untimed.
            order = LAYOUTS[rep % 3:] + LAYOUTS[:rep % 3]
            for layout in order:
                check = rep == 0
                remote = np.array(ask(op="prepare", layout=layout, tokens=tokens, fill=check,
                                      seed=tokens)["descs"], dtype=np.int64)
                local = side.prepare(layout, tokens)
                assert len(local) == len(remote) and (local[:, 1] == remote[:, 1]).all()
                t0 = time.perf_counter()
                ldesc = agent.get_xfer_descs(local, "DRAM")
                rdesc = agent.get_xfer_descs(remote, "DRAM")
                handle = agent.initialize_xfer("READ", ldesc, rdesc, peer)
                t1 = time.perf_counter()
                state = agent.transfer(handle)
                while state == "PROC":
                    state = agent.check_xfer_state(handle)
                t2 = time.perf_counter()
                agent.release_xfer_handle(handle)
                if state != "DONE":
                    raise RuntimeError(f"{layout} {tokens}: transfer {state}")
                if check:
                    want = np.random.default_rng(tokens).integers(
                        0, 255, int(remote[:, 1].sum()), np.uint8)
                    if not np.array_equal(side.read(local), want):
                        raise RuntimeError(f"{layout} {tokens}: bytes differ after the READ")
                else:
                    results.setdefault((tokens, layout), []).append((t2 - t0, t1 - t0, len(local)))
                side.release(layout)
                ask(op="release", layout=layout)
            if rep > 0:
                t0 = time.perf_counter()
                ctypes.memmove(copy_dst.ctypes.data, copy_src.ctypes.data, tokens * row_bytes)
                results.setdefault((tokens, "memcpy"), []).append(
                    (time.perf_counter() - t0, 0.0, 1))
        print(f"# {tokens} tokens done", file=sys.stderr, flush=True)
    ask(op="quit")
    proc.wait(timeout=60)
    side.close(agent)
    report(args, sizes, results)
    sys.stdout.flush()
    os._exit(0)  # As in target().


def report(args, sizes, results):
    mib = args.layers * 2 * args.heads * args.head_dim * 2 / 2**20
    print(f"shape: {args.layers} layers x 2 x {args.heads} KV heads x {args.head_dim} fp16 "
          f"({mib * 1024:.0f} KiB per token); UCX_TLS={os.environ['UCX_TLS']}; "
          f"{args.repeats} repeats, median (min-max), ms")
    print()
    print("| tokens | MiB | memcpy | token-major: descs | time | layer-major: descs | time | "
          "paged: descs | time | paged setup | token-major / paged |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in sizes:
        cells = [str(tokens), f"{tokens * mib:.0f}"]
        copies = [t * 1e3 for t, _, _ in results[(tokens, "memcpy")]]
        cells.append(f"{statistics.median(copies):.2f}")
        med = {}
        for layout in LAYOUTS:
            r = results[(tokens, layout)]
            times = [t * 1e3 for t, _, _ in r]
            med[layout] = statistics.median(times)
            cells += [str(r[0][2]), f"{med[layout]:.2f} ({min(times):.2f}-{max(times):.2f})"]
        prep = [p * 1e3 for _, p, _ in results[(tokens, "paged")]]
        cells.append(f"{statistics.median(prep):.2f}")
        cells.append(f"{med['token-major'] / med['paged']:.2f}")
        print("| " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sizes", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    (target if args.target else initiator)(args)


if __name__ == "__main__":
    main()
