"""Nothing half-written: every file through a temp file + fsync + rename, a run folder swapped in whole.

``write_file(path, writer)`` calls ``writer(tmp)`` with a temporary path in the same folder whose name
ends like ``path`` (``model.keras`` -> ``.model.tmp-<pid>.keras``: Keras and matplotlib pick the format
from the suffix), fsyncs it and renames it over ``path``; a writer that fails leaves ``path`` as it was.

``RunFolder`` stages a whole run in ``.<name>.partial-<pid>`` next to the final folder and swaps it in
only when the run is complete; a run killed at any moment leaves the previous run intact, and the next
run into the same name clears what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil


def _fsync_dir(folder):
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path):
    """A temporary name in ``path``'s folder that keeps its suffix (``.keras``, ``.png``, ``.csv``)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if name.endswith(".weights.h5"):
        stem, ext = name[: -len(".weights.h5")], ".weights.h5"
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")


def write_file(path, writer):
    """Write ``path`` atomically: ``writer(tmp_path)`` writes the content, then fsync and rename."""
    tmp = temp_path(path)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return path


def write_text(path, text):
    def writer(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return write_file(path, writer)


def write_json(path, obj):
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path, df):
    return write_file(path, lambda tmp: df.to_csv(tmp, index=False))


def check_out_folder(out, flag="--out"):
    """ValueError naming ``flag`` unless ``out`` is (or can become) a writable folder."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out!r} is a file, not a folder; give a folder for the runs.")
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {out!r} lies under {probe!r}, which is a file; give a folder path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out!r} is not writable (no write permission on {probe!r}); choose another folder.")


class RunFolder:
    """One run's folder, staged: write into ``.path``, then ``commit()`` swaps it in as ``final``."""

    def __init__(self, out, name, overwrite=False):
        self.out, self.name = out, name
        self.final = os.path.join(out, name)
        self.overwrite = overwrite
        self.path = os.path.join(out, f".{name}.partial-{os.getpid()}")
        self._old = os.path.join(out, f".{name}.old-{os.getpid()}")

    def check(self):
        """Errors before any work: --out usable, and an existing run replaced only with overwrite."""
        check_out_folder(self.out)
        self.recover()
        if os.path.exists(self.final) and not self.overwrite:
            raise ValueError(
                f"run folder {self.final!r} already exists; pass --overwrite to replace it (the old run is "
                "kept until the new one completes) or choose another --run-name / --out."
            )

    def recover(self):
        """Clear what a killed run into this name left: its partial folder, or a swap cut in the middle."""
        if not os.path.isdir(self.out):
            return
        for entry in os.listdir(self.out):
            full = os.path.join(self.out, entry)
            if entry.startswith(f".{self.name}.old-") and not os.path.exists(self.final):
                os.replace(full, self.final)  # killed between the two renames of commit(): put the old run back
            elif entry.startswith(f".{self.name}.partial-") or entry.startswith(f".{self.name}.old-"):
                shutil.rmtree(full, ignore_errors=True)

    def begin(self):
        self.check()
        os.makedirs(self.path)
        return self.path

    def commit(self):
        """Swap the complete staged run in; the previous run (if any) is removed only afterwards."""
        _fsync_dir(self.path)
        had_old = os.path.exists(self.final)
        if had_old:
            os.replace(self.final, self._old)
        os.replace(self.path, self.final)
        _fsync_dir(self.out)
        if had_old:
            shutil.rmtree(self._old, ignore_errors=True)
        return self.final

    def abandon(self):
        shutil.rmtree(self.path, ignore_errors=True)
