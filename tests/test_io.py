"""fem_jax.io: atomic files and folders, stale temporaries of dead processes, umask-honouring
modes, checksums and one-line errors for corrupt JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fem_jax import io

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def umask_set():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def test_stale_siblings_of_dead_processes_are_removed(tmp_path):
    dead, host = _dead_pid(), io._host()
    out = tmp_path / "export"
    out.mkdir()
    (out / "f").write_text("old export")
    stale = [f".export.old-{dead}", f".export.tmp-{dead}-ab12cd", f".export.tmp-{dead}@{host}@xyz",
             f".export.old-{dead}@{host}@"]
    kept = [f".export.tmp-{os.getpid()}@{host}@live",  # a live process (this one)
            f".export.tmp-{dead}@another-host@x",  # a pid of another machine sharing the folder
            f".other.tmp-{dead}-x", ".export.tmp-notapid"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text("x")
    tmp = io.tmp_sibling(out)
    (tmp / "f").write_text("new export")
    assert io.publish(tmp, out) == out
    assert (out / "f").read_text() == "new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *kept])


KILL_MID_REPLACE = """
import os, signal, sys
from pathlib import Path
from fem_jax import io

out = Path(sys.argv[1]) / "export"
tmp = io.tmp_sibling(out)
(tmp / "f").write_text("second")
real = os.replace
def replace_then_die(a, b):
    real(a, b)
    os.kill(os.getpid(), signal.SIGKILL)  # killed between the two renames of publish
os.replace = replace_then_die
io.publish(tmp, out)
"""


def test_publish_killed_mid_replace_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "export"
    first = io.tmp_sibling(out)
    (first / "f").write_text("first")
    io.publish(first, out)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_MID_REPLACE), str(tmp_path)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert left == [".export.old", ".export.tmp"], left  # the window: no `export` at all
    third = io.tmp_sibling(out)
    (third / "f").write_text("third")
    io.publish(third, out)
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (out / "f").read_text() == "third"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_modes_follow_the_umask(tmp_path, umask_set, mask):
    private = tmp_path / "private.txt"
    private.write_text("p")
    os.chmod(private, 0o600)
    public = tmp_path / "public.txt"
    public.write_text("q")
    os.chmod(public, 0o644)
    umask_set(mask)
    assert io.umask() == mask
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask

    io.atomic_write_text(tmp_path / "run" / "metrics.json", "{}")
    assert (tmp_path / "run" / "metrics.json").stat().st_mode & 0o777 == fmode

    out = tmp_path / "out"
    tmp = io.tmp_sibling(out)
    (tmp / "sub").mkdir()
    (tmp / "written.txt").write_text("w")
    shutil.copy(private, tmp / "copied_private.txt")  # copy keeps the source's mode...
    shutil.copy(public, tmp / "sub" / "copied_public.txt")
    io.publish(tmp, out)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    modes["."] = out.stat().st_mode & 0o777
    assert modes == {".": dmode, "sub": dmode, "written.txt": fmode, "copied_private.txt": fmode,
                     "sub/copied_public.txt": fmode}  # ...publish gives it the umask's


def test_umask_without_proc(monkeypatch, umask_set):
    """Where /proc/self/status is not there, the umask is read by setting and restoring it."""
    def no_proc(*a, **k):
        raise FileNotFoundError("/proc/self/status")

    umask_set(0o027)
    monkeypatch.setattr(io, "open", no_proc, raising=False)
    assert io.umask() == 0o027
    assert os.umask(0o027) == 0o027  # and left as it was


def test_sha256_file_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_READ_BYTES", 1000)
    data = os.urandom(2500)
    (tmp_path / "f").write_bytes(data)
    assert io.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert io.sha256_file(tmp_path / "e") == hashlib.sha256(b"").hexdigest()


def test_truncated_json_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"a": [1, 2, 3]})[:8])
    with pytest.raises(ValueError) as e:
        io.read_json(f)
    assert not isinstance(e.value, json.JSONDecodeError)
    assert str(e.value).startswith(f"{f}: not valid JSON") and "\n" not in str(e.value)
    with pytest.raises(io.CorruptError, match="config.json"):
        io.read_json(f, io.CorruptError)
