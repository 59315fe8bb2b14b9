"""Workers started ahead of their attempt: the early worker of ``fit`` and the warm standby of a run.

Starting a worker costs an interpreter and the TensorFlow and Keras import (4-8 s on a small machine),
paid once per call and again at every restart. A ``WaitingWorker`` is a worker process spawned with
``--standby``: it imports them, says ``standby_ready`` over its channel and waits for its go (a
``WorkerGo`` line on stdin). ``WorkerProcess.start`` (process.py) adopts one: it moves it into the
attempt's memory cgroup, points its output at the attempt's ``worker.log``, then sends the go.

- ``fit`` spawns one as soon as its arguments are valid, so the import runs while the run is stored
  and the carry is proven; it is killed and reaped if ``fit`` refuses or fails before the go.
- ``StandbyKeeper`` keeps one warm during training (``[runtime] standby = "auto"``): at an attempt's
  first look it spawns the next attempt's worker, so a restart skips the import; the attempt after
  that gets a new one. Its import runs while the attempt starts up (which leaves a core to spare: the
  import, the model's load and the first trace are mostly one thread's work), so it is done before
  the training runs, and at the lowest CPU priority (``STANDBY_IMPORT_NICE``: its session's and its
  import thread's; the attempt after the go runs at the normal one; worker/__main__.py), so what is
  left of it takes only the CPU the attempt leaves. (Started after the first step instead, its import
  slowed a 2-core training by 10-40% for as long as it lasted, even at nice 19.)
  fit's early worker imports at the normal priority: nothing trains beside it, and the first attempt
  waits for it. It never costs what it saves: none is started after a host OOM
  in the run, nor while the machine's available memory or the headroom under the worker's memory
  limit is below a standby's own memory (measured: its private RSS once imported) plus
  ``STANDBY_MARGIN``; a waiting one is stopped when the machine's available memory falls below the
  margin. Until its go it lives outside the worker's memory cgroup, so its memory is not charged to
  the worker's budget. The kernel leaves pages charged where they were faulted in, so what its import
  took stays charged outside the group after the move: the group's limit leaves that much out
  (``carried_bytes`` in ``memory_enforcement``), and the worker's whole memory stays within the budget.
- A waiting worker dies with the supervisor: ``PR_SET_PDEATHSIG`` and a parent watch in the worker
  (it is spawned on the supervisor's own thread, since the kernel sends that signal when the
  spawning thread ends), and the supervisor kills and reaps it at the end of the run, on Ctrl-C and
  on errors. It never touches the run directory before its go, so the leftover checks (``_tidy``)
  hold while one waits.

A waiting worker is handed an attempt only when the environment it was spawned with is the one a
fresh worker would get now (``worker_env``); everything else an attempt needs (the plan, the fault
schedule, the precision policy, the devices) is read by the worker after its go.

Journal: ``standby_started`` (pid, import_nice), ``standby_ready`` (pid, import_seconds, rss_bytes;
``import_nice``: the nice value of the thread that imported, ``autogroup_nice``: its session's then),
``standby_priority`` (from the adopted worker at its go: the main thread's ``nice``, the session's
``autogroup_nice``, ``threads_raised`` from the import's priority, ``threads_left_low`` where that was refused,
``restored``, and a ``detail`` for what could not be undone; ``restored`` False is also said on the console),
``standby_used`` (attempt, pid, ``early`` or ``standby``, whether it had finished importing),
``standby_skipped`` (reason: ``off``, ``host_oom``, ``machine_memory``, ``limit_headroom``,
``environment_changed``, ``exited``, ``spawn_failed``), ``standby_stopped`` (pid, reason).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Literal

from .._protocol import Notice, WorkerGo, parse_message
from .._rundir import Journal
from .memory import tree_rss

StandbyMode = Literal["auto", "off"]

#: What a standby is assumed to hold until one was measured (then: its private RSS once imported). ``import
#: tensorflow, keras`` (TensorFlow 2.21, Keras 3.15, CPU) measured here: 658 MB resident, of which ~300 MB
#: private; the rest is the libraries' pages, shared with the worker.
STANDBY_RSS_ESTIMATE = 700 << 20
#: Memory that must stay free besides a standby's own for one to be started (and kept, on the machine).
STANDBY_MARGIN = 512 << 20
#: The nice value of a standby's import (the lowest priority): it runs beside an attempt that trains.
STANDBY_IMPORT_NICE = 19
#: Output a waiting worker may write before its go that is kept for the attempt's worker.log.
_PENDING_OUTPUT = 1 << 20


class WorkerOutput:
    """Drains a worker's raw output (TensorFlow's C++ logs, tracebacks, faulthandler's dumps) into its
    attempt's ``worker.log`` (``attach``), in full and nowhere else: the caller sees resilient's display,
    and an incident names the log. Until it is attached (a waiting worker) the output is kept in memory,
    bounded, so the worker never blocks on a full pipe."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._log: IO[bytes] | None = None
        self.thread = threading.Thread(target=self._pump, args=(proc,), name="resilient-output", daemon=True)
        self.thread.start()

    def attach(self, log: IO[bytes]) -> None:
        """From now on the output goes to ``log``, starting with what came before."""
        with self._lock:
            pending, self._pending = bytes(self._pending), bytearray()
            self._log = log
            self._write(pending)

    def _write(self, chunk: bytes) -> None:
        if self._log is not None:
            try:
                self._log.write(chunk)
            except (OSError, ValueError):
                self._log = None  # a full disk (or a closed log): the pipe is still drained
        elif len(self._pending) < _PENDING_OUTPUT:
            self._pending += chunk[: _PENDING_OUTPUT - len(self._pending)]

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the raw output (TensorFlow's C++ logs, tracebacks, faulthandler's dumps) until EOF."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with self._lock:
                self._write(chunk)
        # The end of the output: our end of the pipe closes here (left open, each attempt leaked a descriptor).
        try:
            proc.stdout.close()
        except OSError:
            pass


class WaitingWorker:
    """A worker process that has not been given its attempt yet (``python -m resilient.worker --standby``)."""

    def __init__(self, proc: subprocess.Popen[bytes], channel_fd: int, env: dict[str, str], kind: str,
                 import_nice: int = 0) -> None:
        self.proc = proc
        self.import_nice = import_nice  # asked for its import; the nice it ran at is in ready_fields
        self.channel_fd: int | None = channel_fd  # the channel's read end; the adopter reads it
        self.env = env
        self.kind = kind  # "early" (fit's) or "standby" (kept during training)
        self.spawned = time.monotonic()
        self.output = WorkerOutput(proc)
        self.import_seconds: float | None = None  # from its standby_ready: it has imported
        self.ready_fields: dict[str, object] = {}  # its standby_ready notice's fields
        self.taken = False  # handed to an attempt: killing it is the attempt's business now

    @classmethod
    def spawn(cls, env: dict[str, str], kind: str = "standby", import_nice: int = 0) -> WaitingWorker:
        """Start one, its import at the nice value ``import_nice``; call from the thread that supervises (its
        parent-death signal follows that thread)."""
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "resilient.worker", "--standby", "--channel-fd", str(write_fd),
                 "--supervisor-pid", str(os.getpid()), "--import-nice", str(import_nice)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                env=env, start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(proc, read_fd, env, kind, import_nice)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """Whether it has imported (its ``standby_ready`` line, read here before any go is sent)."""
        if self.import_seconds is None and self.channel_fd is not None and not self.taken:
            try:
                readable, _, _ = select.select([self.channel_fd], [], [], 0)
                # Before its go the worker writes this one line, in one write shorter than PIPE_BUF.
                line = os.read(self.channel_fd, 4096) if readable else b""
            except OSError:
                line = b""
            msg = parse_message(line.strip()) if line.strip() else None
            if isinstance(msg, Notice) and msg.event == "standby_ready":
                self.ready_fields = dict(msg.fields)
                self.import_seconds = float(msg.fields.get("import_seconds", 0.0))
        return self.import_seconds is not None

    def take(self) -> tuple[subprocess.Popen[bytes], int, WorkerOutput]:
        """Hand the process, its channel and its output to an attempt (which then owns them)."""
        assert self.channel_fd is not None and not self.taken
        self.ready()  # consume its ready line if it is there: the attempt's channel starts after it
        self.taken = True
        fd, self.channel_fd = self.channel_fd, None
        return self.proc, fd, self.output

    def go(self, go: WorkerGo) -> None:
        """Send the go; OSError when the process is gone."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(go.model_dump_json().encode() + b"\n")
        self.proc.stdin.flush()
        self.proc.stdin.close()

    def kill(self) -> None:
        """SIGKILL its process group and reap it; nothing once it was handed to an attempt."""
        if self.taken:
            return
        self.taken = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            try:
                self.proc.kill()
            except OSError:
                pass
        for _ in range(3):  # a Ctrl-C during the wait must not leave it unreaped
            try:
                self.proc.wait(timeout=30)
                break
            except KeyboardInterrupt:
                continue
            except subprocess.TimeoutExpired:
                break  # stuck in the kernel: nothing more a signal can do
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self.channel_fd is not None:
            os.close(self.channel_fd)
            self.channel_fd = None


def standby_verdict(mode: StandbyMode, *, host_oom: bool, need: int, available: int | None,
                    limit: int | None, usage: int | None) -> tuple[str, str] | None:
    """Why no standby may be started now, as (reason, detail); None: one may. ``need``: its memory plus the
    margin; ``available``: the machine's available memory; ``limit``, ``usage``: the worker's budget and use."""
    mib = 1 << 20
    if mode == "off":
        return "off", 'the policy sets [runtime] standby = "off"'
    if host_oom:
        return "host_oom", "a host OOM happened in this run: no memory is spent on a standby"
    if available is not None and available < need:
        return "machine_memory", f"{available // mib} MiB available on the machine, a standby needs {need // mib} MiB"
    if limit is not None and usage is not None and limit - usage < need:
        return "limit_headroom", (f"{(limit - usage) // mib} MiB left under the memory limit of {limit // mib} MiB, "
                                  f"a standby needs {need // mib} MiB")
    return None


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


class StandbyKeeper:
    """The run's waiting worker: the early one from ``fit``, then a standby kept for each next attempt."""

    def __init__(self, journal: Journal, mode: StandbyMode, *, early: WaitingWorker | None = None,
                 host_oom: bool = False, enabled: bool = True) -> None:
        self.journal = journal
        self.mode = mode
        self.enabled = enabled  # False: workers come from a test's worker_cmd; no standby applies
        self.host_oom = host_oom
        self.waiting = early
        self.rss = STANDBY_RSS_ESTIMATE  # a standby's memory: measured on each one that got ready
        self._ready_seen: set[int] = set()
        self._skipped: str | None = None  # the reason last journaled for this attempt
        self.available = _available_memory  # the machine's available memory; a seam for tests

    def take(self, attempt: int, env: dict[str, str]) -> WaitingWorker | None:
        """The waiting worker for ``attempt`` (spawned with ``env``, alive), or None: start a fresh one."""
        waiting, self.waiting = self.waiting, None
        self._skipped = None
        if waiting is None:
            return None
        self._note_ready(waiting)
        reason = None if waiting.alive() else "exited"
        if reason is None and waiting.env != env:
            reason = "environment_changed"
        if reason is not None:
            self.journal.write("standby_skipped", attempt=attempt, pid=waiting.pid, reason=reason,
                               returncode=waiting.proc.returncode)
            waiting.kill()
            return None
        self.journal.write("standby_used", attempt=attempt, pid=waiting.pid, kind=waiting.kind,
                           imported=waiting.import_seconds is not None,
                           waited_seconds=round(time.monotonic() - waiting.spawned, 3))
        return waiting

    def tick(self, attempt: int, env: dict[str, str], *, limit: int | None, usage: int | None) -> None:
        """A look from the monitor (its own thread): start a standby as soon as memory allows (from the
        attempt's start-up on); stop a waiting one when the machine runs short."""
        if not self.enabled:
            return
        waiting = self.waiting
        if waiting is not None:
            self._note_ready(waiting)
            available = self.available()
            if available is not None and available < STANDBY_MARGIN:
                self.journal.write("standby_stopped", pid=waiting.pid, reason="machine_memory",
                                   available_bytes=available)
                self.waiting = None
                waiting.kill()
            return
        need = self.rss + STANDBY_MARGIN
        verdict = standby_verdict(self.mode, host_oom=self.host_oom, need=need, available=self.available(),
                                  limit=limit, usage=usage)
        if verdict is not None:
            if verdict[0] != self._skipped:
                self._skipped = verdict[0]
                self.journal.write("standby_skipped", attempt=attempt, reason=verdict[0], detail=verdict[1])
            return
        try:
            self.waiting = WaitingWorker.spawn(env, import_nice=STANDBY_IMPORT_NICE)
        except OSError as exc:
            self.journal.write("standby_skipped", attempt=attempt, reason="spawn_failed", detail=str(exc))
            self.enabled = False
            return
        self.journal.write("standby_started", pid=self.waiting.pid, for_attempt=attempt + 1,
                           expected_rss_bytes=self.rss, import_nice=STANDBY_IMPORT_NICE)

    def _note_ready(self, waiting: WaitingWorker) -> None:
        if waiting.pid in self._ready_seen or not waiting.ready():
            return
        self._ready_seen.add(waiting.pid)
        rss = tree_rss(waiting.pid)
        if rss:
            self.rss = rss  # the next standby's need is this one's measured memory
        self.journal.write("standby_ready", pid=waiting.pid, kind=waiting.kind,
                           import_seconds=waiting.import_seconds, rss_bytes=rss,
                           import_nice=waiting.ready_fields.get("import_nice"),
                           autogroup_nice=waiting.ready_fields.get("autogroup_nice"))

    def close(self) -> None:
        """Kill and reap the waiting worker, if any (the end of the run, Ctrl-C, an error)."""
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.kill()
