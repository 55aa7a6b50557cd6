"""Leases: one worker per piece of shared work, for processes on one machine or on many sharing a filesystem.

A lease is a small JSON file (``schemas/cache-lease-v1.json``: owner id, host, pid, start time,
heartbeat time, unit) that says "this worker is doing this unit". The protocol uses only what
POSIX filesystems (NFS v3+ and Lustre included) make atomic:

* **claim**: create the file with ``O_CREAT | O_EXCL``: of any number of workers, exactly one
  creates it. The creator keeps the file open.
* **heartbeat**: a thread rewrites the file in place every few seconds through that open
  descriptor (padded to a fixed size, so a reader never sees a shorter tail), with ``fsync``
  so readers on other machines see it.
* **stale** (:func:`stale_reason`, pure): the owner ran on *this* host and its pid is gone (the
  kernel says it is dead: taken over at once), or its heartbeat is older than ``stale_s`` (a worker
  on another host, or one that stopped heartbeating). Hosts' clocks must agree to well within
  ``stale_s`` (NTP does). "This host" means the same host name *and* the same ``node``
  (:func:`local_node`: the PID namespace and the boot id), so containers that share a host name
  but not a PID namespace (``docker --net=host``, Kubernetes ``hostNetwork``) never judge each
  other's pids; a lease without a ``node`` (older kcache) is judged by its heartbeat only.
* **takeover**: rename the stale file to a name unique to the stealer. Of two stealers only one
  rename finds the file; the other gets ``ENOENT`` and moves on. Right before renaming, the
  stealer checks that the path still names the file it judged (same inode), and after renaming
  it judges the file it got once more (a fresh lease may have replaced the stale one in the
  microseconds between): if it is live after all it is put back with ``link`` (same inode: its
  holder never notices), otherwise the winner deletes it and claims the unit with ``O_EXCL``
  like anyone else. At any moment at most one file sits at the path, so at most one worker
  holds the lease (:meth:`Lease.held`). A worker can lose a lease it has just taken: while one
  stealer's rename is in flight the path is briefly empty, a fresh ``O_EXCL`` claim can slip in,
  and a second stealer that judged the old file may then move the new one away. The loser sees
  it in :meth:`Lease.held`; at worst two workers do one unit, which is harmless (below).
* **loss**: a holder whose file was taken over finds the path naming another inode (or none);
  :meth:`Lease.held` says so. Losing a lease never corrupts anything in kcache's use: the work
  itself is committed by an atomic rename that only the first finisher wins
  (:mod:`kcache.elastic`), so a lease only keeps two workers from doing the same unit twice.

The heartbeat thread stops when the lease is released or its loss is confirmed on
``LOST_BEATS`` consecutive beats: a takeover's rename-aside briefly empties the path even when the
taker then puts the live lease back.

A worker that hangs while its heartbeat thread lives keeps its lease: stop it (``kill``), and the
unit is taken over at once on its host, or after ``stale_s`` elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kcache.lock import process_alive
from kcache.schemas import SchemaError, validate_document

LEASE_FORMAT = "kcache-lease"
LEASE_BYTES = 1024  # every write pads the JSON to this size: a rewrite in place never leaves a torn, shorter tail
READ_RETRY_S = 1.0  # a lease that does not parse is re-read for this long (its creator may be writing it)
LOST_BEATS = 3  # the heartbeat thread gives a lease up after this many consecutive beats find it gone

# Owner ids of this process that are working now: a lease of this pid is live iff its owner is listed.
_live_owners: set[str] = set()
_guard = threading.Lock()


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def local_node() -> str:
    """Where this process's pids mean something: ``pidns:<inode of /proc/self/ns/pid>;boot:<boot id>``,
    each part when readable ("" where neither is: no /proc, as on macOS, where the host name says
    it all). Two processes whose host names and nodes are equal can test each other's pids."""
    parts = []
    try:
        parts.append(f"pidns:{os.stat('/proc/self/ns/pid').st_ino}")
    except OSError:
        pass
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    if boot:
        parts.append(f"boot:{boot}")
    return ";".join(parts)


def same_node(lease: dict, host: str, node: str) -> bool:
    """Whether the owner of ``lease`` ran where ``host``/``node`` (this process's) can test its pid:
    same host name and same node. A lease without ``node`` (written by an older kcache) never is."""
    return lease.get("host") == host and lease.get("node") == node


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds leases: ``id`` is unique per worker (host, pid and a random token); ``node`` is
    :func:`local_node` (the pid namespace and boot the pid belongs to)."""

    id: str
    host: str
    pid: int
    token: str
    node: str = ""

    @classmethod
    def new(cls) -> Owner:
        host, pid, token = socket.gethostname(), os.getpid(), secrets.token_hex(4)
        return cls(f"{host}/{pid}/{token}", host, pid, token, local_node())

    @property
    def tag(self) -> str:
        """A file-name-safe tag naming this owner: ``w_<host hash>_<pid>_<token>`` (see :func:`parse_tag`);
        the host hash covers the host name and the node."""
        return f"w_{host_hash(self.host, self.node)}_{self.pid}_{self.token}"

    def __enter__(self) -> Owner:
        with _guard:
            _live_owners.add(self.id)
        return self

    def __exit__(self, *exc) -> None:
        with _guard:
            _live_owners.discard(self.id)


def host_hash(host: str, node: str = "") -> str:
    """8 hex digits naming a host (and the :func:`local_node` of a process on it) in file names (host
    names may hold characters file names should not)."""
    key = f"{host}|{node}" if node else host
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_tag(tag: str) -> tuple[str, int] | None:
    """(host hash, pid) of an :attr:`Owner.tag`, or None when ``tag`` is not one."""
    parts = tag.split("_")
    if len(parts) != 4 or parts[0] != "w" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


# ---------------------------------------------------------------------------------------------
# the decision (pure)


def stale_reason(lease: dict, now: float, stale_s: float, host: str, alive: Callable[[dict], bool],
                 node: str = "") -> str | None:
    """Why ``lease`` no longer protects its unit, or None while it does.

    Convention: a lease is stale when

    * its owner ran on this host (``lease["host"] == host`` and ``lease["node"] == node``: the same
      PID namespace and boot, :func:`same_node`) and ``alive(lease)`` is false (its pid is gone):
      the kernel's word beats any heartbeat, so a killed worker's unit is taken over at once;
    * or its heartbeat (seconds since the epoch) is more than ``stale_s`` older than ``now``: the only
      test for a worker on another host (or in another PID namespace). A heartbeat ahead of ``now``
      (a host whose clock runs ahead) counts as fresh.

    A lease without a readable heartbeat must be given one by the caller (the file's mtime).
    Pure: the clock, the host and the liveness test are the caller's.
    """
    if same_node(lease, host, node) and isinstance(lease.get("pid"), int) and not alive(lease):
        return f"its owner (pid {lease['pid']} on {host}) is gone"
    age = now - float(lease.get("heartbeat", 0.0))
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (stale after {stale_s:.0f} s)"
    return None


def pid_alive(lease: dict) -> bool:
    """Whether the process that owns ``lease`` runs (on this host). A lease of this very process is
    live only while its owner is working (:class:`Owner` as a context): one left by an earlier call is not."""
    pid = lease["pid"]
    if pid == os.getpid():
        with _guard:
            return lease.get("owner") in _live_owners
    return process_alive(pid)


# ---------------------------------------------------------------------------------------------
# files


def lease_doc(owner: Owner, unit: int | str, started: float, heartbeat: float) -> dict:
    return {"format": LEASE_FORMAT, "owner": owner.id, "host": owner.host, "node": owner.node, "pid": owner.pid,
            "started": started, "heartbeat": heartbeat, "unit": unit}


def _encode(doc: dict) -> bytes:
    data = json.dumps(doc, sort_keys=True).encode()
    if len(data) >= LEASE_BYTES:
        raise ValueError(f"lease document of {len(data)} bytes does not fit {LEASE_BYTES}")
    return data + b" " * (LEASE_BYTES - 1 - len(data)) + b"\n"


def read_lease(path: Path) -> dict | None:
    """The lease at ``path``; None when there is none. A file that never parses (or does not match
    the schema) within ``READ_RETRY_S`` reads as ``{"heartbeat": <its mtime>}``: stale once it is old."""
    got = _read_lease(path)
    return None if got is None else got[0]


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """Which file this is, and which version of it: an inode number can be reused once its file is
    deleted, and a heartbeat changes the ctime."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _read_lease(path: Path) -> tuple[dict, tuple] | None:
    """:func:`read_lease` and the :func:`_identity` of the file it read."""
    end = time.monotonic() + READ_RETRY_S
    while True:
        try:
            with open(path, "rb") as fh:
                raw, st = fh.read(), os.fstat(fh.fileno())
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            validate_document(doc, "cache-lease-v1", str(path))
            return doc, _identity(st)
        except (ValueError, UnicodeDecodeError, SchemaError):
            if time.monotonic() > end:
                return {"heartbeat": st.st_mtime, "unreadable": True}, _identity(st)
            time.sleep(0.05)


class Lease:
    """A lease this worker holds: the open file it created (see the module docstring)."""

    def __init__(self, path: Path, fd: int, doc: dict):
        self.path, self.fd, self.doc = Path(path), fd, doc
        self._ino = os.fstat(fd).st_ino
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def create(cls, path: Path, owner: Owner, unit: int | str, now: float | None = None) -> Lease | None:
        """Claim ``path`` (``O_CREAT | O_EXCL``); None when a lease is already there."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            return None
        t = time.time() if now is None else now
        doc = lease_doc(owner, unit, t, t)
        try:
            os.pwrite(fd, _encode(doc), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return cls(path, fd, doc)

    def held(self) -> bool:
        """Whether ``path`` still names the file this lease created (not taken over, not removed)."""
        try:
            return not self.closed and os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            return False

    def beat(self, now: float | None = None) -> bool:
        """Refresh the heartbeat in place; False (and nothing written) once the lease is lost."""
        with self._lock:
            if not self.held():
                return False
            self.doc = {**self.doc, "heartbeat": time.time() if now is None else now}
            os.pwrite(self.fd, _encode(self.doc), 0)
            os.fsync(self.fd)
            return True

    def release(self) -> None:
        """Give the lease up: remove the file if it is still ours, close it. Idempotent."""
        with self._lock:
            if self.closed:
                return
            with contextlib.suppress(OSError):
                if self.held():
                    os.unlink(self.path)
            os.close(self.fd)
            self.closed = True


def acquire(path: Path, owner: Owner, unit: int | str, stale_s: float,
            now: Callable[[], float] = time.time) -> tuple[Lease | None, str | None]:
    """Claim ``path``, taking over a stale lease (see the module docstring).

    Returns (lease, None) for a fresh claim; (lease, why) when a stale lease was taken over (``why``
    says whose and why it was stale); (None, who) when a live lease holds it (``who`` describes the
    holder); (None, None) when another worker won a race for it just now.
    """
    lease = Lease.create(path, owner, unit)
    if lease is not None:
        return lease, None
    got = _read_lease(path)
    if got is None:  # released between our create and our read: try once more
        return Lease.create(path, owner, unit), None
    current, seen = got
    why = stale_reason(current, now(), stale_s, owner.host, pid_alive, owner.node)
    if why is None:
        return None, _describe(current)
    lease = take_over(path, owner, unit, stale_s, now, judged=seen)
    return lease, (f"{_describe(current)}: {why}" if lease is not None else None)


def take_over(path: Path, owner: Owner, unit: int | str, stale_s: float,
              now: Callable[[], float] = time.time, judged: tuple | None = None) -> Lease | None:
    """Replace the stale lease at ``path`` by one of ``owner``; None when another worker got there
    first. ``judged``: the :func:`_identity` of the file found stale; a path that names another
    file (or a version of it refreshed since) is left alone."""
    tomb = path.with_name(f"{path.name}.taken.{owner.tag}")
    try:
        if judged is not None and _identity(os.stat(path)) != judged:
            return None
        os.rename(path, tomb)  # of several stealers, exactly one finds the file
    except FileNotFoundError:
        return None
    got = read_lease(tomb) or {"heartbeat": 0.0}
    if stale_reason(got, now(), stale_s, owner.host, pid_alive, owner.node) is None:
        # A fresh lease replaced the stale one between our read and the rename: put it back (same
        # inode, so its holder's held() stays true). If a third worker claimed the path meanwhile,
        # the holder finds its lease lost and its work is not committed twice (kcache.elastic).
        with contextlib.suppress(OSError):
            os.link(tomb, path)
        with contextlib.suppress(OSError):
            os.unlink(tomb)
        return None
    try:
        # The tomb is deleted only after the new lease exists, so the new file cannot get its inode.
        return Lease.create(path, owner, unit)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tomb)


def _describe(lease: dict) -> str:
    if lease.get("unreadable"):
        return "an unreadable lease"
    return f"{lease.get('owner', '?')} (heartbeat {time.time() - float(lease.get('heartbeat', 0)):.0f} s ago)"


@contextlib.contextmanager
def keep_alive(lease: Lease, interval: float):
    """Refresh ``lease`` every ``interval`` seconds on a background thread for the ``with`` block.

    A beat that finds the lease gone is not the end: a takeover's rename-aside empties the path for
    a moment even when the taker then puts the live lease back. The thread stops once the lease is
    released, or after ``LOST_BEATS`` consecutive beats found it gone (lost for good)."""
    stop = threading.Event()

    def run():
        missed = 0
        while not stop.wait(interval):
            try:
                if lease.closed:
                    return
                missed = 0 if lease.beat() else missed + 1
                if missed >= LOST_BEATS:
                    return  # lost: nothing of ours to refresh any more
            except OSError as e:
                if e.errno in (errno.EBADF,):
                    return
                # A transient write error (a network filesystem hiccup): try again next time; a lease
                # that stays unrefreshed goes stale and is taken over, which is safe.
    t = threading.Thread(target=run, name="kcache-lease-heartbeat", daemon=True)
    t.start()
    try:
        yield lease
    finally:
        stop.set()
        t.join()
