"""Crash-safe writes on a local file system: atomic folders and files, the recovery of interrupted
writes, and the one-writer lock of a folder.

A folder is written under a hidden sibling name ``.tmp-<name>-<pid>-<random>/``, flushed to disk,
renamed ``.ready-...`` once complete and then to its final name (an existing folder is moved to
``.trash-...`` first and deleted last), so a reader sees a complete folder or none, and
`recover_interrupted_writes` rolls an interrupted overwrite forward (a ``.ready-`` folder) or back
(a ``.trash-`` folder), never deleting the only complete copy. A file is written to a unique
temporary name, flushed and renamed (`write_file_atomically`). `lock_ticket_dir` takes an
exclusive advisory lock (``flock``) on a folder's lock file, released by the operating system when
the process dies. `ft_keras.tickets` and `ft_keras.FreeTickets` write through these.
"""

import datetime
import json
import os
import secrets
import shutil
import socket

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see lock_ticket_dir
    fcntl = None

from absl import logging

from ft_keras import _checks

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
READY_PREFIX = ".ready-"
WRITE_PREFIXES = (TMP_PREFIX, READY_PREFIX, TRASH_PREFIX)
#: The lock file a writer of a ticket folder holds (`lock_ticket_dir`).
LOCK_FILE = ".ft_keras.lock"


# --------------------------------------------------------------------------------------------
# Atomic folders.


def _fsync_tree(root):
    """Flushes every file and folder under ``root`` to disk (best effort on folders)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _make_unique_dir(parent, prefix):
    """Creates a new folder ``parent/<prefix><random>`` with the umask's permissions.

    (``tempfile.mkdtemp`` would make it 0700, which hides the renamed ticket or export from,
    e.g., a TF Serving process that runs as another user.)
    """
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a unique folder {prefix}* in {parent!r}.")


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dead_writer_folders(parent, base):
    """``{prefix: [names]}`` of the ``.tmp-`` / ``.ready-`` / ``.trash-`` folders of ``base`` in
    ``parent`` whose writer is not alive on this machine, newest name last."""
    found = {prefix: [] for prefix in WRITE_PREFIXES}
    if not os.path.isdir(parent):
        return found
    for name in sorted(os.listdir(parent)):
        for prefix in WRITE_PREFIXES:
            lead = f"{prefix}{base}-"
            if not name.startswith(lead):
                continue
            owner = name[len(lead):].split("-")[0]
            path = os.path.join(parent, name)
            if (owner.isdigit() and _pid_alive(int(owner))) or os.path.islink(path) or not (
                    os.path.isdir(path)):
                continue
            found[prefix].append(name)
    return found


def recover_interrupted_writes(parent, base):
    """Finishes or undoes what writers of ``parent/<base>`` that died left behind.

    `atomic_folder` writes into ``.tmp-<base>-<pid>-*``, renames the complete folder to
    ``.ready-<base>-<pid>-*``, moves an old ``<base>`` aside to ``.trash-<base>-<pid>-*``, renames
    the ready folder to ``<base>`` and deletes the trash. After a crash at any of these points:
    when ``<base>`` is missing, a complete ``.ready-`` folder is renamed into place (rolled
    forward), else a ``.trash-`` folder is renamed back (rolled back); then the other leftovers
    of dead writers are deleted. Folders of live writers on this machine are left alone.

    Returns:
        ``(restored, removed)``: the name ``<base>`` renamed into place from (or None) and the
        removed leftover names.
    """
    found = _dead_writer_folders(parent, base)
    destination = os.path.join(parent, base)
    restored = None
    if not os.path.lexists(destination):
        for prefix in (READY_PREFIX, TRASH_PREFIX):
            if found[prefix]:
                restored = found[prefix].pop()
                os.rename(os.path.join(parent, restored), destination)
                _fsync_dir(parent)
                logging.warning("%s: an interrupted write left %s without %s; %s renamed "
                                "into place", parent, base, base, restored)
                break
    removed = []
    for names in found.values():
        for name in names:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    if removed:
        logging.info("removed leftovers of interrupted writes in %s: %s", parent, removed)
    return restored, removed


def interrupted_writes(parent, base):
    """The names of the leftover ``.ready-`` / ``.trash-`` folders that hold a complete copy of
    ``parent/<base>`` while ``<base>`` itself is missing (an interrupted overwrite)."""
    if os.path.lexists(os.path.join(parent, base)) or not os.path.isdir(parent):
        return []
    return sorted(name for name in os.listdir(parent)
                  if name.startswith((f"{READY_PREFIX}{base}-", f"{TRASH_PREFIX}{base}-")))


def atomic_folder(destination, write, overwrite=False, argument="folder"):
    """Builds a folder with ``write(tmp_path)`` in a hidden sibling, then renames it into place.

    The complete folder is first renamed to a ``.ready-`` name; an existing ``destination`` is
    then renamed aside (``.trash-``), the ready folder renamed into place and the old one
    deleted. A crash at any point leaves either the old or the new folder in place, or a
    complete copy that `recover_interrupted_writes` (run at the start of every write) renames
    back.

    Args:
        destination: the final folder path.
        write: a callable that fills the (existing, empty) temporary folder it is given.
        overwrite: whether to replace an existing ``destination``.
        argument: what ``destination`` is, for error messages (e.g. "ticket folder").

    Returns:
        ``destination``.

    Raises:
        ValueError: ``destination`` exists (as a non-empty folder, or as a file) and
            ``overwrite`` is False.
    """
    parent, base = os.path.split(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    recover_interrupted_writes(parent, base)
    if os.path.lexists(destination):
        empty_dir = os.path.isdir(destination) and not os.listdir(destination)
        if not empty_dir and not overwrite:
            raise ValueError(
                f"{argument} {destination!r} already exists (overwrite=False); pass "
                "overwrite=True to replace it."
            )
    tmp = _make_unique_dir(parent, f"{TMP_PREFIX}{base}-{os.getpid()}-")
    ready = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        ready = _unique_name(parent, f"{READY_PREFIX}{base}-{os.getpid()}-")
        os.rename(tmp, ready)
        _fsync_dir(parent)
        trash = None
        if os.path.lexists(destination):
            trash = _unique_name(parent, f"{TRASH_PREFIX}{base}-{os.getpid()}-")
            os.rename(destination, trash)
        try:
            os.rename(ready, destination)
        except BaseException:
            if trash is not None:
                os.rename(trash, destination)
            raise
        ready = None
        _fsync_dir(parent)
        if trash is not None:
            if os.path.isdir(trash) and not os.path.islink(trash):
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.remove(trash)
    except BaseException:
        for leftover in (tmp, ready):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        raise
    return destination


def _unique_name(parent, prefix):
    """A path ``parent/<prefix><random>`` that does not exist (nothing is created)."""
    path = _make_unique_dir(parent, prefix)
    os.rmdir(path)
    return path


def write_file_atomically(path, data):
    """Writes the bytes ``data`` to ``path`` through a ``<path>.tmp-<pid>`` file that is flushed
    to disk and renamed into place: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# Locks this process holds: real path of the ticket folder -> open lock file descriptor.
_HELD_LOCKS = {}


def lock_ticket_dir(ticket_dir, owner):
    """Makes this process the only writer of ``ticket_dir`` until `unlock_ticket_dir`.

    An exclusive advisory lock (``flock``) on ``ticket_dir/.ft_keras.lock``, a file that records
    the holder (``owner``: a JSON-serialisable dict, plus pid, host and time) and is deleted when
    the lock is released. The operating system drops the lock when the process ends, however it
    ends, so a killed run never leaves a stale lock (only its file, which the next writer takes
    over). Within one process the lock is re-entrant. Where the platform has no ``fcntl``
    (Windows) only the writability of the folder is checked.

    Raises:
        ValueError: ``ticket_dir`` cannot be created or written (the message says why), or
            another process holds the lock (the message names it: pid, host, run, since when).
    """
    ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
    key = os.path.realpath(ticket_dir)
    path = os.path.join(ticket_dir, LOCK_FILE)
    descriptor = _HELD_LOCKS.get(key)
    while descriptor is None:
        try:
            os.makedirs(ticket_dir, exist_ok=True)
            if not os.access(ticket_dir, os.W_OK):
                raise PermissionError(13, "Permission denied")
            candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ValueError(
                f"ticket_dir={ticket_dir!r} cannot be written ({error.strerror or error}): the "
                "run would fail at its first ticket. Use a folder this process can write."
            ) from None
        if fcntl is None:
            descriptor = candidate
            break
        try:
            fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                with open(path, encoding="utf-8") as handle:
                    holder = handle.read().strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(candidate)
            raise ValueError(
                f"ticket_dir={ticket_dir!r} is being written by another run ({holder}); two "
                "runs cannot write into one ticket_dir. Wait for that run to end, or use "
                "another ticket_dir."
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(candidate).st_ino
        except FileNotFoundError:
            same = False
        if same:
            descriptor = candidate
        else:  # the holder released (and deleted) the file between our open and our lock
            os.close(candidate)
    _HELD_LOCKS[key] = descriptor
    record = dict(owner or {}, pid=os.getpid(), host=socket.gethostname(),
                  since=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"))
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record, default=str).encode(), 0)
    return descriptor


def unlock_ticket_dir(ticket_dir):
    """Releases this process's lock on ``ticket_dir`` (if it holds one) and deletes the lock
    file (before the release, so a waiting writer never locks a file that is going away)."""
    descriptor = _HELD_LOCKS.pop(os.path.realpath(ticket_dir), None)
    if descriptor is not None:
        try:
            os.remove(os.path.join(ticket_dir, LOCK_FILE))
        except OSError:
            pass
        os.close(descriptor)  # closing the descriptor releases the flock
