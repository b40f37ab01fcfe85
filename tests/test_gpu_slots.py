"""One GPU per step on a multi-GPU host (resources/gpu_slots.py): the claim logic with real ``flock`` locks, and
``device: auto`` unchanged where there are fewer than two GPUs (this machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resources import gpu_slots


def test_claims_hand_out_distinct_gpus_and_wait_when_all_are_taken(tmp_path):
    a = gpu_slots.try_claim(2, tmp_path)
    b = gpu_slots.try_claim(2, tmp_path)
    assert a is not None and b is not None and {a[0], b[0]} == {0, 1}
    assert gpu_slots.try_claim(2, tmp_path) is None  # both busy
    with pytest.raises(TimeoutError, match="lower the 'gpu' pool limit"):
        gpu_slots.claim(2, tmp_path, timeout_s=0.3, poll_s=0.1)
    os.close(a[1])  # the step process holding GPU a ends
    c = gpu_slots.claim(2, tmp_path, timeout_s=5, poll_s=0.1)
    assert c[0] == a[0]
    os.close(b[1])
    os.close(c[1])


def test_a_claim_dies_with_its_process(tmp_path):
    code = ("import sys, time; from pathlib import Path; from resources import gpu_slots; "
            "print(gpu_slots.try_claim(1, Path(sys.argv[1]))[0], flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert p.stdout.readline().strip() == "0"
        assert gpu_slots.try_claim(1, tmp_path) is None  # held by the other process
    finally:
        p.kill()
        p.wait()
    got = gpu_slots.try_claim(1, tmp_path)  # the kernel released it: no stale lock after a crash
    assert got is not None and got[0] == 0
    os.close(got[1])


def test_step_device(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGELINE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setattr(gpu_slots, "_CLAIMED", None)
    assert gpu_slots.step_device("cpu") == "cpu"
    assert gpu_slots.step_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(gpu_slots, "cuda_device_count", lambda: 1)
    assert gpu_slots.step_device("auto") == "auto"  # one GPU: nothing to choose
    monkeypatch.setattr(gpu_slots, "cuda_device_count", lambda: 4)
    held = gpu_slots.try_claim(1, tmp_path)  # another step holds cuda:0
    assert gpu_slots.step_device("auto") == "cuda:1"
    assert gpu_slots.step_device("auto") == "cuda:1"  # the claim lasts for the process
    os.close(held[1])
    os.close(gpu_slots._CLAIMED[1])
