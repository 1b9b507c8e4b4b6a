"""What every writer of a run folder (``train``, its resumption, ``quickstart``, the teacher cache build) uses, so
that the folder survives what clusters do to a run: kills, preemption signals, full or read-only disks, a second
run started in the same folder, and folders handed over by other people.

* **Verified folders.** :func:`committing` writes a folder (a checkpoint, the best weights, the final model) under
  a temporary name, fsyncs every file, records each file's size and sha256 in ``manifest.json``, fsyncs the folder,
  renames it into place and fsyncs its parent: a crash or a power loss leaves the earlier folder, never a torn new
  one under the final name. :func:`check_manifest` says why a folder cannot be trusted (a file missing, truncated
  or changed), :func:`newest_usable` picks the newest folder that passes and names the ones it skipped.
  :func:`temporary_folder`, :func:`seal` and :func:`discard` are the same steps one by one, for writers that fill
  the folder from several processes (sharded checkpoints): the manifest covers whatever the folder holds.
* **Failed writes** (no space, read-only, no permission) raise :class:`WriteFailed`, one line naming what could not
  be written and why (:func:`writing`); the temporary folder is removed and what was there before is kept.
* **No code from run folders.** Optimizer, scheduler and RNG state go through :func:`save_state` /
  :func:`load_state`: tensors in safetensors, everything else as JSON in its header; nothing is unpickled.
* **One writer per folder.** :class:`RunLock` (``run.lock``, an exclusive ``flock``) refuses a second writer with
  a one-line error naming the holder's PID; a lock left by a process that died is taken over with a warning.
* **Stop signals.** :class:`StopSignals` turns SIGTERM and SIGINT into a request to stop at the next safe point;
  a writer that stops there raises :class:`Interrupted` (exit code 128 + the signal's number).

Several processes (torchrun): :func:`on_main_process` runs a step on the main process only (the one that writes)
and gives every process its outcome, so that all go on together or all raise the same one-line error.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

MANIFEST = "manifest.json"
LOCK = "run.lock"
T = TypeVar("T")


class WriteFailed(UserError):
    """A write into a run folder failed (no space left, a read-only file system, no permission)."""


class RunFolderBusy(UserError):
    """Another live process holds the run folder's lock."""


class Interrupted(Exception):
    """A run stopped on SIGTERM or SIGINT at a safe point, after writing what it needs to continue. The command
    line exits with :attr:`exit_code`, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a process
    killed by that signal would, so that schedulers see an interrupted job rather than a finished one."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def warn(message: str) -> None:
    """One line on stderr (the run goes on)."""
    print(f"bispikclm: warning: {message}", file=sys.stderr, flush=True)


# ---- failed writes ------------------------------------------------------------------------------------------------

def os_reason(err: BaseException) -> str | None:
    """The operating system's words for a failed write: ``OSError.strerror``, or the OS error a safetensors
    ``SafetensorError`` wraps (``... (os error 28)``); ``None`` for other errors."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if type(err).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(err))
        if found:
            return os.strerror(int(found.group(1)))
    return None


@contextlib.contextmanager
def writing(what: str, after: str = "") -> Iterator[None]:
    """Turn a failed write inside into :class:`WriteFailed` ``cannot write WHAT: <reason>AFTER``."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as err:
        reason = os_reason(err)
        if reason is None:
            raise
        raise WriteFailed(f"cannot write {what}: {reason}{after}") from None


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (files created, renamed or removed) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file beside it, fsynced, renamed over it, the folder
    fsynced. A crash leaves the old content or the new one, never a mix. Raises ``OSError`` on a failed write (wrap
    the call in :func:`writing`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# ---- verified folders ---------------------------------------------------------------------------------------------

def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in
                  (MANIFEST, LOCK))


def write_manifest(folder: str | Path) -> dict:
    """fsync every file under ``folder`` (and its subfolders) and write ``manifest.json``: each file's path
    relative to the folder, its size and its sha256. Returns the manifest."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path, sync=True)}
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(sub)
    manifest = {"format": 1, "files": files}
    write_file(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def check_manifest(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be trusted (no or an unreadable manifest, a file missing, of another size or another
    sha256 than the manifest records), or ``None`` if every file it records is there, whole and unchanged."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST} (an unfinished write, or written by a version without manifests)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, digest in entries:
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names a file outside the folder ({name})"
        try:
            if not path.is_file():
                return f"{name} is missing"
            actual = path.stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, the manifest says {size}"
            if _sha256(path) != digest:
                return f"{name} does not match its sha256 in the manifest"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"cannot read {name}: {err.strerror}"
    return None


def temporary_folder(final: str | Path) -> Path:
    """The name :func:`committing` fills before ``final`` is sealed (``.tmp-<name>`` beside it; every process of a
    run computes the same one)."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}")


def seal(tmp: str | Path, final: str | Path) -> None:
    """Finish a folder filled under ``tmp``: fsync its files, write its manifest, fsync it, rename it to ``final``
    (an earlier ``final`` is moved aside first and removed after) and fsync the parent. Main process only."""
    tmp, final = Path(tmp), Path(final)
    write_manifest(tmp)
    fsync_dir(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: str | Path) -> None:
    """Remove an unfinished temporary folder."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def committing(final: str | Path, what: str | None = None, after: str = "") -> Iterator[Path]:
    """``with committing(final) as tmp:`` write the files of ``final`` into the fresh folder ``tmp``; on leaving the
    block the folder is sealed (:func:`seal`) under ``final``. If the block or the sealing fails, ``tmp`` is removed,
    an earlier ``final`` stays as it was, and a failed write becomes :class:`WriteFailed` ``cannot write WHAT: ...``
    (WHAT defaults to the folder's path)."""
    final = Path(final)
    tmp = temporary_folder(final)
    with writing(what or str(final), after):
        try:
            discard(tmp)
            tmp.mkdir(parents=True)
            yield tmp
            seal(tmp, final)
        except BaseException:
            discard(tmp)
            raise


def remove_unfinished(parent: str | Path) -> None:
    """Clear what an interrupted :func:`committing` left in ``parent``: temporary folders are removed, and a folder
    that :func:`seal` had moved aside gets its name back if nothing replaced it."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for tmp in parent.glob(".tmp-*"):
        discard(tmp)
    for old in parent.glob(".old-*"):
        final = parent / old.name[len(".old-"):]
        if final.exists():
            discard(old)
        else:
            os.rename(old, final)


def newest_usable(parent: str | Path, check: Callable[[Path], str | None] = check_manifest,
                  pattern: str = "step-*") -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest folder ``parent/<pattern>`` (by name; ``step-<zero-padded n>``) that ``check`` passes, and
    ``(name, why)`` for every newer one it skipped, and for a folder that a ``parent/latest`` pointer names but
    that is gone. ``(None, skipped)`` when none passes."""
    parent = Path(parent)
    skipped = []
    latest = parent / "latest"
    if latest.is_file():
        try:
            name = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if name and not (parent / name).is_dir():
            skipped.append((name, f"named by {latest.name}, but missing"))
    for folder in sorted((p for p in parent.glob(pattern) if p.is_dir()), reverse=True):
        reason = check(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder.name, reason))
    return None, skipped


# ---- state without pickle -----------------------------------------------------------------------------------------

def save_state(state: Any, path: str | Path) -> None:
    """Write nested state (dicts, lists, tuples, strings, numbers, booleans, ``None`` and tensors, as optimizer and
    scheduler ``state_dict()`` hold) to one safetensors file: the tensors as its tensors, the rest as JSON in its
    header. :func:`load_state` reads it back equal, tensors bit for bit, without running any code."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(x):
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"dict": {k: encode(v) for k, v in x.items()}}
            return {"pairs": [[encode(k), encode(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {type(x).__name__: [encode(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_state cannot store {type(x).__name__}")

    structure = json.dumps(encode(state))
    save_file(tensors, str(path), metadata={"structure": structure})


def load_state(path: str | Path) -> Any:
    """The state :func:`save_state` wrote to ``path``; ``ValueError`` if the file is not such a state."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            structure = json.loads((f.metadata() or {})["structure"])

            def decode(x):
                if isinstance(x, dict):
                    ((kind, value),) = x.items()
                    if kind == "tensor":
                        return f.get_tensor(value)
                    if kind == "dict":
                        return {k: decode(v) for k, v in value.items()}
                    if kind == "pairs":
                        return {decode(k): decode(v) for k, v in value}
                    if kind in ("list", "tuple"):
                        items = [decode(v) for v in value]
                        return items if kind == "list" else tuple(items)
                    raise ValueError(f"unknown entry {kind!r}")
                return x

            return decode(structure)
    except Exception as err:   # whatever a damaged or crafted file makes the reader raise
        raise ValueError(f"{Path(path).name} is not a saved state ({type(err).__name__}: {err})") from None


# ---- several processes --------------------------------------------------------------------------------------------

def _distributed():
    """``torch.distributed`` when this process is one of several (the process group started, as Accelerate starts
    it under torchrun), else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        PartialState(cpu=not torch.cuda.is_available())
    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def is_main_process() -> bool:
    dist = _distributed()
    return dist is None or dist.get_rank() == 0


def on_main_process(step: Callable[[], T]) -> T:
    """Run ``step`` on the main process only and return its result on every process; if it raises a
    :class:`UserError`, every process raises one with the same message. One process: ``step()``."""
    dist = _distributed()
    if dist is None:
        return step()
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", step())]
        except UserError as err:
            outcome = [("error", str(err))]
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


# ---- one writer per folder ----------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict) -> str:
    return (f"PID {record.get('pid')} ({record.get('command', 'bispikclm')} on host {record.get('host', '?')}, "
            f"since {record.get('since', '?')})")


_HELD: dict[str, list] = {}         # resolved folder -> [RunLock, depth] of the locks this process holds


class RunLock:
    """The lock of a run folder, ``<folder>/run.lock``: an exclusive ``flock`` held while the process writes, and a
    JSON record of the holder (PID, host, command, start time) for the error a second writer gets.

    A second process is refused with a one-line :class:`RunFolderBusy` naming the holder. The kernel releases the
    ``flock`` when the holder dies, however it dies; a record left behind by a dead holder is taken over with a
    warning. Re-entrant within a process. On release the file is removed (and the folder too, if the lock created
    it and nothing else was written), so that a command that fails after taking the lock leaves the folder's files
    as they were. Where the file system has no ``flock`` at all, the record alone guards against a live holder on
    the same host."""

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        key = str(self.folder.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            return
        with writing(f"the lock {self.path}"):
            self._created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, locked = self._open_locked()
            try:
                previous = self._read(fd)
                if previous and previous.get("pid") != os.getpid():
                    if not locked and previous.get("host") == socket.gethostname() and _alive(int(previous["pid"])):
                        raise RunFolderBusy(f"{self.folder} is in use by {_describe(previous)}; wait for it to end "
                                            f"or stop it")
                    warn(f"taking over the lock of {self.folder} from {_describe(previous)}, which is no longer "
                         f"running")
                record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        _HELD[key] = [self, 1]

    def _open_locked(self) -> tuple[int, bool]:
        """An open descriptor of ``run.lock`` holding its flock (``False``: the file system has no flock)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                who = _describe(holder) if holder else "another process"
                raise RunFolderBusy(f"{self.folder} is in use by {who}; wait for it to end or stop it") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                warn(f"the file system of {self.folder} has no file locks ({err.strerror}); a second run in this "
                     f"folder on another host would not be stopped")
                locked = False
            try:    # the holder removes the file on release: the descriptor may name a file that is gone
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd, locked
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "pid" in record else None

    def release(self) -> None:
        key = str(self.folder.resolve())
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        lock = held[0]
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.path.unlink()
        os.close(lock._fd)
        lock._fd = None
        if lock._created_folder:
            with contextlib.suppress(OSError):
                lock.folder.rmdir()          # only if empty


@contextlib.contextmanager
def locked(folder: str | Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s :class:`RunLock` for the block: taken by the main process of a multi-process run (the one
    that writes), with every process refused together if another run holds it."""
    lock = RunLock(folder, command)
    on_main_process(lock.acquire)
    try:
        yield
    finally:
        if is_main_process():
            lock.release()


_COMMAND_LOCKS = contextlib.ExitStack()
atexit.register(_COMMAND_LOCKS.close)


def hold(folder: str | Path, command: str) -> None:
    """Take ``folder``'s lock (as :func:`locked`) until the command ends: the command line releases it
    (:func:`release_held`) when the command returns or fails, the interpreter at exit otherwise."""
    _COMMAND_LOCKS.enter_context(locked(folder, command))


def release_held() -> None:
    """Release the locks :func:`hold` took."""
    _COMMAND_LOCKS.close()


# ---- stop signals -------------------------------------------------------------------------------------------------

class StopSignals:
    """``with StopSignals() as stop:`` SIGTERM (what schedulers send before they kill) and SIGINT (Ctrl-C) no longer
    kill the process: ``stop.received`` becomes the first signal's number, and the writer stops at its next safe
    point. Further SIGTERMs are ignored (launchers and schedulers often send several); a second SIGINT interrupts at
    once. Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, what: str = "stopping at the next safe point, after a checkpoint") -> None:
        self.what = what
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        print(f"bispikclm: {signal.Signals(signum).name} received: {self.what} (a second Ctrl-C stops at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def agreed(self) -> int:
        """The signal every process of the run acts on: the largest number any of them received (0: none)."""
        dist = _distributed()
        if dist is None:
            return self.received
        import torch

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([self.received], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
