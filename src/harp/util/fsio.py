"""Writing files so that an interrupted run never leaves a half-written one, and the saved progress of
resumable runs (the alpha search, `harp compare`): one home for both.

- `atomic_dir`: a whole output folder appears in one rename (or the old one stays);
- `atomic_file` / `write_text_atomic` / `write_json_atomic`: one file, written beside its final name
  and renamed over it;
- `check_output` / `require_output`: the one check that an output can be written (collected or raised);
- `output_lock`: one run per output at a time;
- `read_state`: the saved progress of a resumable run, if it belongs to this run.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harp.util.problems import Collector


@contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False, name: str = "out") -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    `path` is checked first (`require_output`; `name` is the parameter it came from). An interrupted
    write leaves only a hidden `.NAME.tmp-*` folder, never a half-written `path`.
    """
    out = require_output(path, overwrite, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _readable_by_all(tmp)
        if out.exists():
            # one atomic step where the OS has it: a kill at any moment leaves the old folder or the new one
            if _rename_exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _readable_by_all(folder: Path) -> None:
    """Files as the user's umask makes them (0644 usually): some writers (safetensors) create 0600 files."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


@contextmanager
def output_lock(path: str | os.PathLike[str], what: str = "harp prune") -> Iterator[Path]:
    """Hold an exclusive lock on an output path for the whole run: a second run on the same output
    refuses at once instead of interleaving its search state and checkpoint with the first one's.

    The lock is an flock on `.NAME.harp-lock` next to the output, so a run killed with -9 leaves no
    stale lock behind (the file may stay; the lock dies with the process)."""
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.harp-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise FileExistsError(
                f"{out} is being written by another run ({holder}): wait for it to finish, or choose another "
                "`out`. Two runs on one output would mix their search state and checkpoint."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield lock
        finally:
            os.ftruncate(fd, 0)
            try:
                os.remove(lock)
            except OSError:
                pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` (a hidden `.NAME.tmp-*` ending in `suffix`, for writers that
    pick the format by extension); on success it replaces `path` in one rename, on failure it goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


class StateMismatch(ValueError):
    """A state file exists but is not this run's: `damaged` (not JSON) or another version / run."""

    def __init__(self, path: Path, damaged: bool) -> None:
        self.path, self.damaged = path, damaged
        super().__init__(f"{path} is {'damaged (not JSON)' if damaged else 'the state of another run'}.")


def read_state(path: str | os.PathLike[str] | None, version: int, fingerprint: str) -> dict[str, Any] | None:
    """The saved progress of a resumable run: the JSON object at `path` if it has this `version` and
    `fingerprint` (what the run depends on), None if there is no file. Raises StateMismatch otherwise;
    the caller says what to do about it."""
    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):  # harp's writes are atomic: someone else's damage
        raise StateMismatch(path, damaged=True) from None
    if not isinstance(state, dict) or state.get("version") != version or state.get("fingerprint") != fingerprint:
        raise StateMismatch(path, damaged=False)
    return state


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(
    out_path: str | os.PathLike[str] | None, overwrite: bool, inputs: Iterable[Path | None], out: Collector,
    name: str = "out", is_file: bool = False, files: Iterable[str] = (),
) -> Path | None:
    """Collect in `out` why the output `name` cannot be written; return it resolved (None for none).

    The one output check (`require_output` raises what it finds). The output is a folder, replaced as a
    whole: not an existing non-empty folder without `overwrite`. With `is_file`, a file: not a folder,
    not an existing file without `overwrite`. With `files`, a folder that may hold other things, into
    which these files are written: none of them may exist without `overwrite`. Always: the nearest existing
    parent is a writable folder, and the output is not the input, inside it, or containing it."""
    if out_path is None:
        return None
    p = Path(out_path).expanduser().resolve()
    files = tuple(files)
    if is_file:
        _check_file(p, overwrite, name, out)
    else:
        _check_folder(p, overwrite, name, files, out)
    _check_parent(p, name, out)
    _check_apart(p, inputs, name, out)
    return p


def require_output(
    path: str | os.PathLike[str], overwrite: bool = False, *, name: str = "out", is_file: bool = False,
    files: Iterable[str] = (), inputs: Iterable[Path | None] = (),
) -> Path:
    """`check_output`, raising what it finds (one problem as its FileExistsError / PermissionError /
    NotADirectoryError, several as one `Problems`). Returns the resolved path. Nothing is written."""
    out = Collector()
    p = check_output(path, overwrite, inputs, out, name=name, is_file=is_file, files=files)
    out.raise_if_any()
    assert p is not None
    return p


def _refuse(out: Collector, msg: str, error: type[OSError] = FileExistsError) -> None:
    out.add(msg, error(msg))


def _check_file(p: Path, overwrite: bool, name: str, out: Collector) -> None:
    if p.is_dir():
        _refuse(out, f"`{name}={p}` is a folder; give a file path.")
    elif p.exists() and not overwrite:
        _refuse(out, f"`{name}={p}` exists: choose another path, or pass `overwrite=True` to replace it.")


def _check_folder(p: Path, overwrite: bool, name: str, files: tuple[str, ...], out: Collector) -> None:
    if p.exists() and not p.is_dir():
        _refuse(out, f"`{name}={p}` exists and is not a directory: choose another `{name}`.")
    elif files:
        existing = [str(p / f) for f in files if (p / f).exists()]
        if existing and not overwrite:
            _refuse(out, f"{', '.join(existing)} already exist(s): choose another `{name}` or pass `overwrite=True`.")
    elif p.is_dir() and any(p.iterdir()) and not overwrite:
        _refuse(out, f"`{name}={p}`: output directory already exists and is not empty: choose another path, or "
                "pass `overwrite=True` to replace it.")


def _check_parent(p: Path, name: str, out: Collector) -> None:
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        _refuse(out, f"`{name}={p}`: {probe} is a file, so no folder can be made there.", NotADirectoryError)
    elif not os.access(probe, os.W_OK | os.X_OK):
        _refuse(out, f"`{name}={p}`: Cannot write to {probe} (permissions): choose an output you can write to.",
                PermissionError)


def _check_apart(p: Path, inputs: Iterable[Path | None], name: str, out: Collector) -> None:
    for src in inputs:
        if src is None:
            continue
        s = Path(src).expanduser().resolve()
        if _inside(p, s) or _inside(s, p):
            where = "is the input" if p == s else ("is inside the input" if _inside(p, s) else "contains the input")
            out.add(f"`{name}={p}` {where} {s}: writing it would damage the model being read. Choose an output "
                    "outside the input.")
