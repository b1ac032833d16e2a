# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""Prefill -> decode through NIXL, two processes (examples/nixl_handoff.py):
each has its own vattn cache (Host backend), they swap NIXL metadata over a
socket on 127.0.0.1, decode pulls every request with one NIXL READ over the
slot ranges, checks every byte, keeps decoding, and prefill frees only after
the transfer. The verdicts are JSON files each role writes and flushes
before NIXL is torn down (NIXL 1.5.1's UCX agent may crash at interpreter
exit on its own; vattn's own teardown is checked before that, in the role,
and reported in the verdict)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("nixl._api", reason="NIXL is not installed (make test-python installs it)")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "nixl_handoff.py")
LAYERS = 4  # examples/nixl_handoff.py's SHAPE.


def run(tmp_path, *extra):
    env = dict(os.environ, UCX_TLS="shm,self", UCX_NET_DEVICES="lo")
    proc = subprocess.run([sys.executable, EXAMPLE, "--workdir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    verdicts = {}
    for role in ("prefill", "decode"):
        path = tmp_path / f"{role}.json"
        if path.exists():
            verdicts[role] = json.loads(path.read_text())
    return proc, verdicts


@pytest.mark.parametrize("layout", ["token-major", "layer-major"])
def test_handoff_moves_every_byte_and_tears_down(tmp_path, layout):
    prompts = [1, 100, 1000, 3000]
    proc, verdicts = run(tmp_path, "--layout", layout, "--prompts", ",".join(map(str, prompts)),
                         "--decode-tokens", "8")
    assert set(verdicts) == {"prefill", "decode"}, proc.stdout + proc.stderr
    pre, dec = verdicts["prefill"], verdicts["decode"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pre["ok"] and dec["ok"], (pre, dec)
    assert pre["freed_after_done"] == len(prompts)
    for v in (pre, dec):
        assert v["active_slots_at_end"] == 0
        assert v["vattn_present_before_close"] and v["vattn_teardown_ok"]
    assert [r["tokens"] for r in dec["requests"]] == prompts
    for r in dec["requests"]:
        assert r["descriptors"] == (1 if layout == "token-major" else 2 * LAYERS)
        assert r["mismatches"] == 0 and r["mismatches_after_decode"] == 0
        assert r["bytes"] == r["tokens"] * LAYERS * 2 * 2 * 64 * 2


def test_a_corrupted_prompt_is_caught(tmp_path):
    # Prefill changes one element of request 1 after writing it: decode's
    # byte check must see exactly that one, and the run must fail.
    proc, verdicts = run(tmp_path, "--prompts", "100,500", "--corrupt-request", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    dec = verdicts["decode"]
    assert not dec["ok"]
    assert [r["mismatches"] for r in dec["requests"]] == [0, 1]
