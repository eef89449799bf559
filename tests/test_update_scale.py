"""benchmarks/update_scale.py: the peak memory a fresh process reports is its own."""
import os
import subprocess
import sys

from conftest import load_script

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "update_scale.py")




def test_a_child_process_does_not_report_its_parents_peak():
    # Linux carries ru_maxrss across fork + exec: a child started by a parent holding 1 GiB reported
    # >= 1 GiB whatever it did, so every variant showed the benchmark process's own peak.
    us = load_script("benchmarks/update_scale.py")
    held = bytearray(1024 * 2**20)
    held[:: 4096] = b"\1" * len(held[:: 4096])  # resident, not just reserved
    code = f"import importlib.util as u; s = u.spec_from_file_location('m', {SCRIPT!r}); m = u.module_from_spec(s); " \
           "s.loader.exec_module(m); print(m.peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    child_peak = int(out.strip().splitlines()[-1])
    assert us.peak_rss_bytes() >= 1024 * 2**20  # the parent's own peak counts what it holds
    # the child imported keras/TensorFlow (the benchmark's imports): hundreds of MiB, not the parent's GiB
    assert 50 * 2**20 < child_peak < 1024 * 2**20, child_peak
    del held


def test_memory_phases_report_the_resident_set_after_the_fit_and_each_update():
    us = load_script("benchmarks/update_scale.py")
    [result] = us.main(["--models", "cnn", "--no-timing", "--no-memory", "--memory-phases"])
    for path in ("numpy", "compiled"):
        rows = result["memory_phases"][path]
        assert [r["after"] for r in rows] == ["fit"] + [f"update {i + 1}" for i in range(us.PHASE_UPDATES)]
        # a TensorFlow process holds hundreds of MiB; its peak is never below what it holds now
        assert all(200 * 2**20 < r["rss"] <= r["peak"] for r in rows), rows
