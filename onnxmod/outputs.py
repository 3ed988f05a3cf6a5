"""The one rule for where a command may write (docs/DESIGN.md "Outputs").

Every writing command calls :func:`check_output` before any work, then writes
through :func:`onnxmod.modelio.atomic_path` (files) or :func:`atomic_dir` (dirs):

* an existing output is refused unless ``force``;
* even with ``force``, never replaced: an input of the command, a directory holding
  one or a file inside an input directory, the current directory or one of its
  parents, a directory that is not an onnxmod output (no ``manifest.json``) or that
  holds files onnxmod did not write, anything but a regular file or symbolic link
  where a file is expected (a device such as /dev/null), a directory where a file is
  expected and the other way round;
* an output under a regular file, or in a place that cannot be written, is refused
  up front (one line, exit 2) rather than after minutes of work.

Temporary outputs are hidden siblings named after the output and the writing
process: ``.NAME.<pid>.<random>.tmp`` while writing, ``.NAME.old-<pid>`` for the
swapped-out previous output during ``--force``. A run killed hard (SIGKILL, power
loss) can leave them behind; :func:`clean_stale` removes those whose process is
gone and reports the ones it cannot attribute.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from onnxmod.errors import OnnxmodError

MANIFEST = "manifest.json"
# names onnxmod writes into an output dir besides the files its manifest lists
OWNED_PATTERNS = (MANIFEST, "module_*.onnx")

log = logging.getLogger("onnxmod")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- temp names
_tracked: set[Path] = set()  # outputs this process may have temps of (see sweep_own_temps)


def temp_prefix(out: Path) -> str:
    """Prefix of the hidden temp beside ``out`` that this process writes (registers ``out`` for sweep_own_temps)."""
    _tracked.add(Path(out).absolute())
    return f".{out.name}.{os.getpid()}."


def old_name(out: Path) -> Path:
    """Where ``out`` is parked while ``--force`` swaps in the new one."""
    _tracked.add(Path(out).absolute())
    return out.with_name(f".{out.name}.old-{os.getpid()}")


_TEMP_RE = re.compile(r"\.(?P<pid>\d+)\.[^.]+\.tmp$")
_OLD_RE = re.compile(r"\.old-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _sweep(out: Path, mine: Callable[[int], bool]) -> list[Path]:
    """Remove the temps of ``out`` whose writer ``mine(pid)`` says are ours to remove; return those left.

    A parked previous output (``.NAME.old-<pid>``) goes back to ``NAME`` when the swap
    was cut between its two renames, so a killed ``--force`` never loses the old output.
    """
    parent = out.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    kept = []
    head = f".{out.name}."
    for e in entries:
        if not e.name.startswith(head):
            continue
        tail = e.name[len(head) - 1:]  # ".<pid>.<rand>.tmp" or ".old-<pid>"
        temp, old = _TEMP_RE.fullmatch(tail), _OLD_RE.fullmatch(tail)
        m = temp or old
        if m is None:
            if e.name.endswith(".tmp"):
                kept.append(e)
            continue
        if not mine(int(m.group("pid"))):
            kept.append(e)
        elif old and not (out.exists() or out.is_symlink()):
            os.replace(e, out)
        else:
            _remove(e)
    return kept


def clean_stale(out: PathLike) -> list[Path]:
    """Remove hidden temp outputs of ``out`` left by dead processes; return those left alone.

    A temp whose writer still runs is another run in progress and is kept; one
    whose name carries no process id (older onnxmod) is reported, not deleted.
    """
    out = Path(out).absolute()
    kept = _sweep(out, lambda pid: pid != os.getpid() and not _pid_alive(pid))
    for e in kept:
        if not _TEMP_RE.fullmatch(e.name[len(out.name) + 1:]):
            log.warning("%s: left by an earlier run (no process id in its name); remove it by hand", e)
    return kept


def sweep_own_temps() -> None:
    """Remove every temp this process created (the CLI calls it when interrupted).

    A signal can land between creating a temp and entering the block that would remove
    it; temps are named after their output and our pid, so they are found here.
    """
    for out in list(_tracked):
        _sweep(out, lambda pid: pid == os.getpid())
    _tracked.clear()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# --------------------------------------------------------------------------- the rule
def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_place(out: Path) -> None:
    """The output's parent must be (or become) a writable directory."""
    anc = out.absolute().parent
    while not anc.exists():
        if anc.is_symlink():
            raise OnnxmodError(f"{out}: cannot write: {anc} is a broken symbolic link")
        anc = anc.parent
    if not anc.is_dir():
        raise OnnxmodError(f"{out}: cannot write: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OnnxmodError(f"{out}: cannot write: {anc} is not writable")
    if anc == out.absolute().parent:  # a real probe: read-only mounts, odd file systems
        try:
            fd, probe = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".tmp", dir=str(anc))
        except OSError as e:
            raise OnnxmodError(f"{out}: cannot write in {anc} ({e.strerror or type(e).__name__})") from None
        try:
            os.close(fd)
        finally:
            os.unlink(probe)


def owned_files(directory: Path) -> set[str] | None:
    """Relative paths onnxmod wrote into ``directory`` per its manifest; None when it is not an onnxmod output."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested too deep: not an onnxmod output
        return None
    if not isinstance(data, dict):
        return None
    listed = [m.get("file") for m in data.get("modules", []) if isinstance(m, dict)]
    listed += list(data.get("files", [])) if isinstance(data.get("files"), list) else []
    return {MANIFEST} | {str(f) for f in listed if isinstance(f, str)}


def _foreign_files(directory: Path, owned: set[str]) -> list[str]:
    """Entries of ``directory`` onnxmod did not write (sub-directories too, empty or not)."""
    foreign = []
    for root, dirs, files in os.walk(directory):
        for name in files + dirs:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if name in dirs and not os.path.islink(os.path.join(root, name)):
                if not any(o.startswith(rel + os.sep) for o in owned):
                    foreign.append(rel + os.sep)
            elif rel not in owned and not any(fnmatch.fnmatch(rel, pat) for pat in OWNED_PATTERNS):
                foreign.append(rel)
    return sorted(foreign)


def _check_replaceable_dir(out: Path, inputs: list[Path]) -> None:
    if out.is_symlink():
        raise OnnxmodError(f"{out}: is a symbolic link; not replaced, even with --force")
    if not out.is_dir():
        raise OnnxmodError(f"{out}: exists and is not a directory; not replaced, even with --force")
    resolved = out.resolve()
    held = [i for i in inputs if _is_within(i, resolved)]
    if held:
        raise OnnxmodError(f"{out}: holds an input of this command ({held[0]}); not replaced, even with --force")
    owned = owned_files(out)
    if owned is None:
        raise OnnxmodError(f"{out}: is not an onnxmod output (no readable {MANIFEST}); not replaced, even with --force")
    foreign = _foreign_files(out, owned)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OnnxmodError(f"{out}: holds files onnxmod did not write ({', '.join(foreign[:3])}{more}); "
                           "not replaced, even with --force")


def check_output(out: PathLike, inputs: Iterable[PathLike | None] = (), force: bool = False,
                 directory: bool = False) -> Path:
    """Validate ``out`` before any work (see the module docstring); return it as a Path.

    ``inputs``: every path the command reads (model, data, weights, class list...).
    ``directory``: the output is a directory (else a file).
    """
    out = Path(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise OnnxmodError(f"{out}: is the current directory or holds it; give a new path for the output")
    given = [Path(i) for i in inputs if i is not None]
    ins = [i.resolve() for i in given]
    for raw, i in zip(given, ins):
        if i == resolved:
            raise OnnxmodError(f"{out}: is also an input ({raw}); inputs are never overwritten")
    _check_place(out)
    if out.exists() or out.is_symlink():
        inside = next((i for i in ins if i.is_dir() and _is_within(resolved, i)), None)
        if directory:
            if not force:
                raise OnnxmodError(f"{out}: already exists (use --force to replace an earlier onnxmod output)")
            _check_replaceable_dir(out, ins)
        elif out.is_dir() and not out.is_symlink():
            raise OnnxmodError(f"{out}: is a directory, expected a file path")
        elif not force:
            raise OnnxmodError(f"{out}: already exists (use --force to overwrite it)")
        elif not out.is_symlink() and not out.is_file():  # a device, fifo or socket: never replaced
            raise OnnxmodError(f"{out}: is not a regular file; not replaced, even with --force")
        if inside is not None:
            raise OnnxmodError(f"{out}: is part of an input ({inside}); not replaced, even with --force")
    clean_stale(out)
    return out


# --------------------------------------------------------------------------- writing dirs
def temp_dir(out: PathLike) -> Path:
    """A new hidden temp dir beside ``out`` (created with its parents)."""
    out = Path(out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".tmp", dir=str(parent)))
    except OSError as e:
        raise OnnxmodError(f"{out}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None


def replace_dir(new: Path, dest: PathLike) -> None:
    """Move the finished ``new`` to ``dest``; an existing ``dest`` (checked by check_output) is swapped out then deleted."""
    dest = Path(dest)
    new.chmod(0o755)
    if dest.exists():
        old = old_name(dest)
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


@contextlib.contextmanager
def atomic_dir(out: PathLike) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; it becomes ``out`` only if the block succeeds, else it is removed."""
    tmp = temp_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
