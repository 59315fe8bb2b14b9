"""``python -m resilient.worker``: one training attempt in a fresh process.

The process is armed before anything slow: it dies with the supervisor (``PR_SET_PDEATHSIG`` and a
parent watch), is the kernel's first choice when the machine runs out of RAM, dumps a Python stack
on a segfault, and turns SIGTERM into a flag the training honours at the next optimizer update
(SIGUSR1, the supervisor's memory-pressure request, into a flag for a checkpoint at the next one).

Exit codes (``resilient._protocol``): 0 the training completed; ``EXIT_REPORTED`` an exception ended
it and ``attempts/NNN/error.json`` (an ``ErrorReport``) says what was raised; ``EXIT_PREEMPTED``
SIGTERM honoured after a checkpoint; ``EXIT_ORPHANED`` the supervisor went away. The worker does
not judge its exception: the supervisor classifies the report.

With ``--standby`` the worker is started ahead of its attempt (fit starts one while it stores the run;
the supervisor keeps one warm during training for the next restart): it arms itself, imports
TensorFlow and Keras (no device is listed or initialised, no data or model is read), says
``standby_ready`` over the channel, and waits for its go, a ``WorkerGo`` line on stdin that names the
run directory, the attempt and its plan. From there it runs exactly as a worker started for that
attempt. End of input without a go (the supervisor dismissed it) exits 0.

A standby kept during training imports beside the attempt that trains (``--import-nice 19``): on a small
machine the import's seconds of CPU would slow that training. Two kernel rules decide what a nice value
does, so the import is lowered under both, and the attempt runs at the normal priority after the go:

- Where the kernel groups tasks by session (``/proc/sys/kernel/sched_autogroup_enabled``, processes in
  the root CPU cgroup: most plain Linux machines), each session shares the CPU as one and a thread's
  nice value counts only within its session. The standby leads its own session, so it sets its
  session's nice value (``/proc/self/autogroup``) to 19 for the import and back at the go (raising it
  back to 0 needs no privilege; the kernel takes one change per 0.1 s system-wide, so it is retried).
- Elsewhere nice values are per thread: the import runs in a thread that lowered its own priority,
  while the main thread, which creates TensorFlow's thread pools when the attempt runs, keeps the
  worker's. Threads started during the import (OpenBLAS's pool, started when NumPy loads) inherit the
  low value: at the go they are raised to the main thread's, which needs ``CAP_SYS_NICE`` (or an
  ``RLIMIT_NICE`` that allows it).

A go that comes while the import still runs (a fault before the standby was ready) brings the priority
back at once: the attempt waits for that import now. What could not be undone is named in the
``standby_priority`` notice (and said on the console when the attempt itself would train at the low
priority), never left low silently. Importing in a thread is sound here: importing TensorFlow and Keras
installs no Python signal handler (only the main thread may), creates no eager context and lists no
device, and the only thread-local state it sets (Keras's ``nnx_enabled``, False) reads the same from
any thread by default.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import faulthandler
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .._protocol import (
    EXIT_ORPHANED,
    EXIT_PREEMPTED,
    EXIT_REPORTED,
    ChannelWriter,
    ErrorReport,
    Heartbeat,
    Notice,
    WorkerGo,
)
from .._rundir import RunDir, atomic_write_text
from .attempt import Attempt, Preempted

_PR_SET_PDEATHSIG = 1


def _die_with_parent(supervisor_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent watch below still ends us
    if os.getppid() != supervisor_pid:  # the supervisor died before PDEATHSIG was armed
        os._exit(EXIT_ORPHANED)


def _watch_parent(supervisor_pid: int) -> None:
    """Exit once the supervisor is gone (a backstop where PDEATHSIG is missing or was reset)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != supervisor_pid:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="resilient-parent-watch", daemon=True).start()


def _volunteer_for_oom_kill() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # if the machine runs out of RAM, the kernel takes us, not the notebook
    except OSError:
        pass


def setup_process(supervisor_pid: int, sigterm: threading.Event, pressure: threading.Event | None = None) -> None:
    """Arm the process before TensorFlow loads; SIGTERM sets ``sigterm``, SIGUSR1 ``pressure``."""
    os.umask(0o077)  # what the worker writes in the run directory (which holds code) is private: 0600 / 0700
    _die_with_parent(supervisor_pid)
    _volunteer_for_oom_kill()
    _watch_parent(supervisor_pid)
    signal.signal(signal.SIGTERM, lambda *_: sigterm.set())
    if pressure is not None:
        signal.signal(signal.SIGUSR1, lambda *_: pressure.set())
    faulthandler.enable()  # a segfault still leaves a Python stack in worker.log


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resilient.worker")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--attempt", type=int, default=None)
    parser.add_argument("--channel-fd", type=int, default=None)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--plan", default=None, help="this attempt's plan (JSON); default: run_dir/plan.json")
    parser.add_argument("--standby", action="store_true",
                        help="import TensorFlow, then wait for the attempt on stdin (a WorkerGo JSON line)")
    parser.add_argument("--import-nice", type=int, default=0,
                        help="with --standby: the nice value (0-19) of the thread that imports TensorFlow")
    args = parser.parse_args(argv)
    if not args.standby and (args.run_dir is None or args.attempt is None):
        parser.error("--run-dir and --attempt are required without --standby")
    if not 0 <= args.import_nice <= 19:
        parser.error(f"Invalid value for argument `--import-nice`. Received: {args.import_nice}. Expected a nice "
                     "value from 0 (the worker's own priority) to 19 (the lowest).")
    return args


#: Per-thread nice values (``setpriority`` on a thread id) and autogroups are Linux's; elsewhere the import runs
#: at the worker's priority.
_LINUX = sys.platform.startswith("linux")
_AUTOGROUP = "/proc/self/autogroup"
#: How long a change of the autogroup's nice value is retried while the kernel answers EAGAIN (its rate limit).
_AUTOGROUP_PATIENCE = 2.0


def _thread_nice(tid: int | str) -> int | None:
    """The nice value of one of this process's threads (/proc/self/task/TID/stat), None when it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[16])  # field 19 of proc(5); the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _thread_name(tid: int | str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _autogroup_nice() -> int | None:
    """The nice value of this process's autogroup (``/autogroup-123 nice 0``), None where there is none."""
    try:
        with open(_AUTOGROUP) as f:
            return int(f.read().rsplit("nice", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup_nice(nice: int, patience: float = _AUTOGROUP_PATIENCE) -> str | None:
    """Set this process's autogroup's nice value; None when done, else why not."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with open(_AUTOGROUP, "w") as f:
                f.write(str(nice))
            return None
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() >= deadline:
                return f"setting {_AUTOGROUP} to {nice}: {exc.strerror or exc}"
            time.sleep(0.05)


class _Priority:
    """What a standby lowered for its import, and undoes at the go (see the module docstring)."""

    def __init__(self, nice: int) -> None:
        self.nice = nice if _LINUX else 0
        self.autogroup_before: int | None = None  # the session's nice value before the import; None: untouched
        self.raised = 0  # threads raised back so far
        self.hurried = False  # the go came while the import ran: it finished at the normal priority

    def lower_session(self) -> None:
        """The session's share of the CPU at ``nice`` (only a session of its own: a standby leads one)."""
        if self.nice <= 0 or os.getsid(0) != os.getpid():
            return
        before = _autogroup_nice()
        if before is not None and before < self.nice and _set_autogroup_nice(self.nice) is None:
            self.autogroup_before = before

    def hurry(self) -> None:
        """The go came while the import still runs: the attempt waits for it, so it finishes at the normal
        priority (from the main thread)."""
        self.hurried = True
        self.restore()

    def restore(self) -> dict[str, object]:
        """At the go (from the main thread): the session back at its nice value, threads started during the
        import at the main thread's. Returns the ``standby_priority`` notice's fields: ``nice`` (the main
        thread's), ``autogroup_nice``, ``threads_raised``, ``threads_left_low``, ``hurried``, ``restored``
        (False: the attempt itself runs at a low priority), and a ``detail`` for anything not undone."""
        problems = []
        if self.autogroup_before is not None and _autogroup_nice() != self.autogroup_before:
            refused = _set_autogroup_nice(self.autogroup_before)
            if refused:
                problems.append(refused)
        nice = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux: the calling (main) thread's
        low = []
        for tid in sorted(os.listdir("/proc/self/task"), key=int):
            current = _thread_nice(tid)
            if current is None or current <= nice:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                self.raised += 1
            except OSError as exc:
                low.append({"tid": int(tid), "name": _thread_name(tid), "nice": current})
                if len(low) == 1:
                    problems.append(f"{exc.strerror}: raising a thread's priority needs CAP_SYS_NICE or an "
                                    "RLIMIT_NICE that allows it; the threads left low were started during the "
                                    "import (the main thread and the training's thread pools are not among them)")
        autogroup = _autogroup_nice()
        fields: dict[str, object] = {
            "nice": nice, "autogroup_nice": autogroup, "threads_raised": self.raised, "threads_left_low": low,
            "hurried": self.hurried, "restored": self.autogroup_before is None or autogroup == self.autogroup_before,
        }
        if problems:
            fields["detail"] = "; ".join(problems)
        return fields


def _join_import(thread: threading.Thread, priority: _Priority, go_waiting: Callable[[], bool] | None) -> None:
    """Wait for the import thread; a go that comes meanwhile (``go_waiting``) hurries it (``_Priority.hurry``)."""
    while thread.is_alive():
        thread.join(0.05)
        if thread.is_alive() and not priority.hurried and go_waiting is not None and go_waiting():
            priority.hurry()


def _import_keras(priority: _Priority, go_waiting: Callable[[], bool] | None = None) -> dict[str, float | int | None]:
    """Import TensorFlow and Keras, at the priority asked (in a thread of that nice value, the session lowered
    too: see the module docstring; back to normal should the go come first); returns the ``standby_ready``
    notice's fields: ``import_seconds``, ``import_nice`` (the nice value of the thread that imported; None: not
    read, off Linux) and ``autogroup_nice`` (the session's during the import; None: no autogroup)."""
    result: dict[str, float | int | None] = {"import_nice": None}

    def work() -> None:
        started = time.monotonic()
        if _LINUX:
            tid = threading.get_native_id()
            if priority.nice > 0:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, max(priority.nice, os.getpriority(os.PRIO_PROCESS, tid)))
                except OSError:
                    pass  # the import runs at the worker's priority; import_nice says so
            result["import_nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        try:
            import keras  # noqa: F401  (TensorFlow with it; importing lists no device and creates no context)
        except BaseException:
            pass  # the attempt imports it again and reports what it raises in error.json
        result["import_seconds"] = round(time.monotonic() - started, 3)

    if priority.nice > 0:
        priority.lower_session()
        result["autogroup_nice"] = _autogroup_nice()
        thread = threading.Thread(target=work, name="resilient-import", daemon=True)
        thread.start()
        _join_import(thread, priority, go_waiting)
    else:
        work()
    return result


def _wait_for_go(channel: ChannelWriter, import_nice: int = 0) -> WorkerGo | None:
    """A standby's wait: import what every attempt imports (at ``import_nice``), say so, then read the go
    (None: dismissed); the priority is back to normal before the attempt starts."""
    priority = _Priority(import_nice)

    def go_waiting() -> bool:  # the go (or the end of input) is there to read
        return bool(select.select([sys.stdin.buffer], [], [], 0)[0])

    channel.send(Notice(event="standby_ready", fields=_import_keras(priority, go_waiting)))
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return None
    go = WorkerGo.model_validate_json(line)
    if priority.nice > 0:
        channel.send(Notice(event="standby_priority", fields={"import_nice": priority.nice, **priority.restore()}))
    # The attempt's code must not inherit the supervisor's pipe as its stdin.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return go


def main(argv: list[str] | None = None) -> int:
    """Run one attempt; the exit code says how it ended."""
    args = _parse_args(argv)
    sigterm, pressure = threading.Event(), threading.Event()
    setup_process(args.supervisor_pid, sigterm, pressure)
    channel = ChannelWriter(args.channel_fd)
    if args.standby:
        go = _wait_for_go(channel, args.import_nice)
        if go is None:
            return 0
        args.run_dir, args.attempt, args.plan = go.run_dir, go.attempt, go.plan
    channel.open_board()  # the step at every step, in shared memory (StepBoard)
    run = RunDir(args.run_dir)
    attempt_dir = run.attempt_dir(args.attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    channel.send(Heartbeat(phase="startup", epoch=0, step=0))
    attempt: Attempt | None = None
    try:
        attempt = Attempt(run, args.attempt, channel, plan_file=args.plan, sigterm=sigterm, pressure=pressure)
        attempt.run_training()
    except Preempted:
        _write_report(attempt_dir, None, attempt, kind="preempted", channel=channel)
        return EXIT_PREEMPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        if attempt is not None:
            try:
                attempt.finish_writes()  # a snapshot taken before the failure still becomes a generation
            except BaseException:
                pass  # the failure that ended the training is the one reported
        _write_report(attempt_dir, exc, attempt, channel=channel)
        traceback.print_exc()
        return EXIT_REPORTED
    return 0


#: The traceback's tail sent over the channel when error.json cannot be written (a message is one pipe write).
_SENT_TRACEBACK = 8000


def _write_report(attempt_dir: Path, exc: BaseException | None, attempt: Attempt | None,
                  kind: str | None = None, channel: ChannelWriter | None = None) -> None:
    """error.json; where the disk cannot take it (full), the same report over the channel."""
    report = ErrorReport.of(exc, kind=kind, epoch=attempt.epoch if attempt else None,
                            step=attempt.global_step if attempt else None)
    try:
        atomic_write_text(attempt_dir / "error.json", report.model_dump_json())
    except OSError as write_error:
        if channel is None:
            raise
        sent = report.model_copy(update={"traceback": report.traceback[-_SENT_TRACEBACK:]})
        channel.send(Notice(event="error_report", fields={"report": sent.model_dump(mode="json"),
                                                          "unwritten": f"error.json: {write_error}"}))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TensorFlow's can hang or crash after a failed step.
    os._exit(code)
