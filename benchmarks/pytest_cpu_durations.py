"""pytest plugin: CPU seconds per test, for comparing test-suite changes on a loaded machine.

Wall times (``--durations``) on a machine shared with other work mostly measure the load. This plugin
records, per test (setup + call + teardown), the CPU time of the pytest process (all its threads)
plus that of the subprocesses it waited for, next to the wall time, prints the 40 largest and the
totals, and with ``CPUPLUG_OUT=path.json`` writes every row. CPU time is not load-free either
(TensorFlow's worker threads spin while they wait, and timing loops with a fixed wall-time budget get
less CPU under load), so compare runs made under similar load, base and new back to back:

    PYTHONPATH=$PWD:$PWD/benchmarks CPUPLUG_OUT=/tmp/new.json python -m pytest -q -p pytest_cpu_durations tests/test_x.py
"""

import json
import os
import resource
import time

import pytest

_rows = []


def _cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    _rows.append({"id": item.nodeid, "cpu": _cpu_seconds() - cpu, "wall": time.perf_counter() - wall})


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("CPUPLUG_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(_rows, fh, indent=0)


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    write("--- CPU seconds per test (setup + call + teardown, subprocesses included) ---")
    for row in sorted(_rows, key=lambda r: -r["cpu"])[:40]:
        write(f"{row['cpu']:8.2f} cpu {row['wall']:8.2f} wall  {row['id']}")
    write(f"TOTAL cpu {sum(r['cpu'] for r in _rows):.1f}  wall {sum(r['wall'] for r in _rows):.1f}  n={len(_rows)}")
