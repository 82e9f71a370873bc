"""Files and folders written so that a killed process never leaves a half-written one under
its final name, with the modes a plain open()/mkdir() would give, and checked on the way back.

- `atomic_write_bytes` / `_text` / `_jsonl`: a temporary sibling (`.NAME.tmp-PID@HOST@XXXXXXXX.tmp`),
  fsync, then rename; the next write of NAME removes those of dead processes.
- `atomic_folder` (`tmp_sibling` + `publish`): build a folder under a hidden temporary
  name next to its destination, then rename it into place (replacing an older one).
  Temporary and replaced folders carry the writer's pid and host
  (`.NAME.tmp-PID@HOST@XXXXXXXX`, `.NAME.old-PID@HOST@`); the next `tmp_sibling` for NAME
  removes those whose process is gone on this host, and those of the older hostless form.
- `hash_files` / `check_files`: a manifest of (size, sha256) per file and its check, for
  checkpoint steps and Hugging Face exports alike; a mismatch raises an error naming the
  file.
- `read_json` / `read_jsonl`: a corrupt file is a one-line error naming it.

Modes: tempfile makes files 0600 and folders 0700 whatever the umask; everything written
here is brought to `0o666 & ~umask` (files) and `0o777 & ~umask` (folders) before it gets
its final name, so a teammate reads a shared run folder as the umask intends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

_READ_BYTES = 8 * 1024**2  # hashing reads this much at a time
_umask_lock = threading.Lock()


class CorruptError(ValueError):
    """A file differs from what its manifest (or its format) says: truncated, overwritten,
    missing or unreadable. The message names the file."""


# ----------------------------------------------------------------------------- modes


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc, since 4.7);
    elsewhere set and restored at once under a lock (other threads creating files in that
    instant would get mode 0o077 & ~mode, so we keep that instant as short as it can be)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


def file_mode(executable: bool = False) -> int:
    return (0o777 if executable else 0o666) & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _chmod_tree(folder: Path) -> None:
    """Give `folder` and everything below it the modes mkdir()/open() would (exec bits kept)."""
    fmode, dmode, xmode = file_mode(), dir_mode(), file_mode(executable=True)
    os.chmod(folder, dmode)
    for base, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(base, d), dmode)
        for f in files:
            p = os.path.join(base, f)
            if not os.path.islink(p):
                os.chmod(p, xmode if os.stat(p).st_mode & 0o111 else fmode)


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)  # a writer of `path` killed before its rename left one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}@{_host()}@", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp made it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON in `path`; a truncated or otherwise invalid file raises `error` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def fsync_dir(d: str | os.PathLike) -> None:
    """Make a rename inside `d` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- atomic folders


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(out: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders and files next to `out` left by dead processes
    of this host (or of the older form without a host); return what was removed. One of
    another host, or of a live pid (possibly reused by an unrelated process), stays."""
    out = Path(out)
    pat = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:@([^@]*)@|-|$)")
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if not m or (m.group(2) is not None and m.group(2) != _host()) or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not p.exists():
            removed.append(p)
    return removed


def tmp_sibling(out: str | os.PathLike) -> Path:
    """A fresh, empty temporary folder next to `out` (private, 0700, until `publish` gives it
    the umask's modes), to be filled and then published as `out`. Stale siblings of dead
    processes are removed first."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}@{_host()}@", dir=out.parent))


def publish(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the finished folder `tmp` (from `tmp_sibling(out)`) to `out`, replacing an older
    `out`; modes below `tmp` are first set as mkdir()/open() would (copied files keep their
    source's otherwise). On failure `tmp` is removed.

    The remaining window: replacing an existing `out` takes two renames (out ->
    .NAME.old-PID@HOST@, then tmp -> out); in between, `out` does not exist, and a process
    killed right there leaves no `out` until the next publish; its `.old` and `.tmp` folders
    are removed by the next `tmp_sibling` for that name. A reader never sees a partial `out`.
    A new `out` (none before) appears by one atomic rename.
    """
    tmp, out = Path(tmp), Path(out).absolute()
    try:
        _chmod_tree(tmp)
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}@{_host()}@")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_folder(out) as tmp:` fill `tmp`; when the block ends normally, `tmp` is
    published as `out`; when it raises, `tmp` is removed and `out` left as it was."""
    tmp = tmp_sibling(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _pool_map(fn, items: list) -> list:
    """hashlib releases the GIL on large buffers: hash several files at once."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


def hash_files(folder: str | os.PathLike, skip: Iterable[str] = ()) -> dict[str, dict]:
    """{relative posix path: {"bytes", "sha256"}} of every file below `folder`, sorted;
    `skip` names relative paths to leave out."""
    folder = Path(folder)
    skip = set(skip)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in names if n not in skip]
    digests = _pool_map(lambda n: sha256_file(folder / n), names)
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}


def check_files(folder: str | os.PathLike, files: dict[str, dict], manifest: str | os.PathLike,
                error: type[Exception] = CorruptError, checksums: bool = True,
                extra_ok: Iterable[str] | None = None) -> None:
    """Check the files below `folder` against `files` (from `hash_files`, as stored in the
    file `manifest`): each present, of its size and, with `checksums`, its sha256. With
    `extra_ok` (the names allowed beside them), a file the manifest does not list is an
    error too. Raises `error` naming the first file that differs."""
    folder, name = Path(folder), Path(manifest).name
    try:
        want = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise error(f"{manifest}: unreadable manifest (bad 'files' entry: {e!r})") from None
    for rel, (size, _) in want.items():
        f = folder / rel
        if not f.is_file():
            raise error(f"{f}: listed in {name} but missing")
        if f.stat().st_size != size:
            raise error(f"{f}: {f.stat().st_size} bytes, {name} says {size} (truncated or overwritten)")
    if extra_ok is not None:
        allowed = set(want) | set(extra_ok)
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.relative_to(folder).as_posix() not in allowed:
                raise error(f"{p}: not listed in {name} (added after it was written)")
    if checksums:
        rels = list(want)
        for rel, got in zip(rels, _pool_map(lambda r: sha256_file(folder / r), rels)):
            if got != want[rel][1]:
                raise error(f"{folder / rel}: sha256 differs from {name} (corrupt)")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX flock), held for the block; elsewhere a no-op.
    The file stays: removing a lock file while another process waits on it would race."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
