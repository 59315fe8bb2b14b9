"""A scripted stand-in for ``python -m resilient.worker``: speaks the channel protocol, no TensorFlow.

Used by tests/test_supervisor.py through ``SupervisorConfig.worker_cmd``::

    python tests/fake_worker.py --script SCRIPT.json --run-dir DIR --attempt N --channel-fd FD

SCRIPT.json holds ``{"attempts": {"0": [action, ...], ...}, "default": [action, ...]}``; attempt N runs
its own list, or ``default``. An action is ``{"do": name, ...}``:

    hello skip_steps=0             Hello (pid, resumed step, batches the resumed epoch skips)
    beat n=1 interval=0.01 pace={}  n train heartbeats, one step each, step_seconds=interval; with pace
                                   ({batch size: seconds per step}) they also report that timing for the
                                   attempt's plan (timed_steps/timed_seconds), without taking that long
    checkpoint                     a real checkpoint (CheckpointStore) at the current step + CheckpointSaved
    phase name=restore              a heartbeat in that phase (no step time), as the worker's start-up sends
    epoch_begin steps=... epochs=1 steps_per_epoch=steps
                                   EpochBegin at the current step: the steps left in this epoch and
                                   the run's length (one step is one batch of the attempt's plan)
    epoch_end                      EpochEnd
    fault kind=...                 FaultFired at the current step
    notice event=... fields={}     Notice (something to journal)
    print text=...                 a line on stdout
    stamp name=...                 write time.time() to attempts/N/<name>
    alloc mb=... chunk_mb=16       allocate and touch memory, kept alive
    sleep seconds=...              silence (no heartbeats)
    ignore_sigterm                 SIG_IGN for SIGTERM
    await_sigterm then=report|exit4 timeout=10 save_seconds=0
                                   heartbeat until SIGTERM arrives, take save_seconds to "save" (a "save"
                                   heartbeat first, as the worker's; then stamp
                                   attempts/N/saved), then write a "preempted" error.json and exit 4
                                   (then=report) or just exit 4 (then=exit4)
    spawn_child seconds=...        start a grandchild that sleeps; its pid goes to attempts/N/child_pid
    signal name=SIGSEGV            kill ourselves with that signal
    report kind=... type= message= traceback= errno= exit=3
                                   write attempts/N/error.json, exit (kind null: a report of facts only)
    fill name=...                  write zeros to run_dir/<name> until the disk is full
    plant path=...                 a directory run_dir/<path> holding one file (what a killed save leaves)
    result epochs=1                write result.json (history carries plan.json's batch size), exit 0
    exit code=...                  exit with that code

SIGUSR1 (the supervisor's memory-pressure request) appends a line to attempts/N/pressure, as the
worker's handler sets its checkpoint flag. Whatever the script says, the process ends itself after ``--max-life`` seconds or when its parent goes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

EXIT_OVERLIVED = 99


def _early_heartbeat(fd: int) -> None:
    # Sent before any import so that a slow interpreter start cannot read as a hang.
    try:
        os.write(fd, b'{"type":"heartbeat","phase":"startup","epoch":0,"step":0}\n')
    except OSError:
        pass


def _import_resilient_light() -> None:
    # resilient/__init__ imports the fit machinery (numpy and more); the modules used here need only
    # pydantic. A bare package object lets them load without it, which keeps each start well under a second.
    if "resilient" not in sys.modules:
        package = types.ModuleType("resilient")
        package.__path__ = [str(Path(__file__).resolve().parent.parent / "resilient")]
        sys.modules["resilient"] = package


def _guard(max_life: float, parent: int) -> None:
    deadline = time.monotonic() + max_life
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            os._exit(EXIT_OVERLIVED)
        time.sleep(0.1)
    os._exit(EXIT_OVERLIVED)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--max-life", type=float, default=30.0)
    args = parser.parse_args()
    _early_heartbeat(args.channel_fd)
    threading.Thread(target=_guard, args=(args.max_life, os.getppid()), daemon=True).start()

    _import_resilient_light()
    from resilient._checkpoint import CheckpointStore
    from resilient._protocol import (
        ChannelWriter,
        CheckpointSaved,
        EpochBegin,
        EpochEnd,
        FaultFired,
        Heartbeat,
        Hello,
        Notice,
    )
    from resilient._rundir import RunDir, atomic_write_text

    run = RunDir(args.run_dir)
    adir = run.attempt_dir(args.attempt)
    adir.mkdir(parents=True, exist_ok=True)
    (adir / "pid").write_text(str(os.getpid()))
    script = json.loads(Path(args.script).read_text())
    actions = script.get("attempts", {}).get(str(args.attempt), script.get("default", []))
    channel = ChannelWriter(args.channel_fd)
    store = CheckpointStore(run.checkpoints)
    meta = store.latest_meta()
    resumed = meta["step"] if meta else None
    step = resumed or 0
    batch = json.loads((adir / "plan.json").read_text())["batch_size"] if (adir / "plan.json").exists() else None
    timed_steps, timed_seconds = 0, 0.0
    sigterm = threading.Event()
    held: list[bytes] = []

    def on_pressure(*_: object) -> None:
        with open(adir / "pressure", "a") as f:
            f.write(f"{time.time()}\n")

    signal.signal(signal.SIGUSR1, on_pressure)

    for action in actions:
        do = action["do"]
        if do == "hello":
            channel.send(Hello(pid=os.getpid(), epoch=0, step=step, resumed_from=resumed,
                               skip_steps=int(action.get("skip_steps", 0))))
        elif do == "beat":
            interval = float(action.get("interval", 0.01))
            pace = action.get("pace", {}).get(str(batch))
            for _ in range(int(action.get("n", 1))):
                time.sleep(interval)
                step += 1
                timing = {}
                if pace is not None:
                    timed_steps, timed_seconds = timed_steps + 1, timed_seconds + float(pace)
                    timing = {"timed_steps": timed_steps, "timed_seconds": timed_seconds}
                channel.send(Heartbeat(epoch=0, step=step, step_seconds=interval, **timing))
        elif do == "phase":
            channel.send(Heartbeat(phase=action["name"], epoch=0, step=step))
        elif do == "checkpoint":
            started = time.monotonic()
            saved = store.save(step, {"epoch": 0, "offset": step * 32},
                               lambda d, s=step: (d / "weights.bin").write_bytes(s.to_bytes(8, "little") * 64))
            channel.send(CheckpointSaved(epoch=0, step=step, seconds=time.monotonic() - started,
                                         bytes=saved.nbytes, path=str(saved.path)))
        elif do == "epoch_begin":
            steps = int(action["steps"])
            channel.send(EpochBegin(epoch=0, step=step, epochs=int(action.get("epochs", 1)), steps=steps,
                                    steps_per_epoch=int(action.get("steps_per_epoch", steps)), samples_per_step=batch))
        elif do == "epoch_end":
            channel.send(EpochEnd(epoch=0, step=step, logs={"loss": 0.5}))
        elif do == "fault":
            kind = action["kind"]
            channel.send(FaultFired(kind=kind, step=step, key=f"{kind}@{step}"))
        elif do == "notice":
            channel.send(Notice(event=action["event"], fields=action.get("fields", {})))
        elif do == "print":
            print(action["text"], flush=True)
        elif do == "stamp":
            (adir / action["name"]).write_text(repr(time.time()))
        elif do == "alloc":
            chunk = int(action.get("chunk_mb", 16)) << 20
            total = int(action["mb"]) << 20
            while sum(map(len, held)) < total:
                held.append(b"\x01" * chunk)  # filled, so every page is resident
        elif do == "sleep":
            time.sleep(float(action["seconds"]))
        elif do == "ignore_sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif do == "await_sigterm":
            signal.signal(signal.SIGTERM, lambda *_: sigterm.set())
            deadline = time.monotonic() + float(action.get("timeout", 10.0))
            while not sigterm.is_set() and time.monotonic() < deadline:
                channel.send(Heartbeat(epoch=0, step=step, step_seconds=0.05))
                sigterm.wait(0.05)
            if not sigterm.is_set():
                return 98  # the supervisor never sent SIGTERM
            channel.send(Heartbeat(phase="save", epoch=0, step=step))
            time.sleep(float(action.get("save_seconds", 0)))
            (adir / "saved").write_text(repr(time.time()))
            if action.get("then", "report") == "report":
                atomic_write_text(adir / "error.json", json.dumps({
                    "kind": "preempted", "type": None, "message": "", "traceback": "", "epoch": 0, "step": step,
                }))
            return 4
        elif do == "spawn_child":
            import subprocess

            child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(float(sys.argv[1]))",
                                      str(action["seconds"]), "fake_worker.py grandchild"])
            (adir / "child_pid").write_text(str(child.pid))
        elif do == "signal":
            os.kill(os.getpid(), getattr(signal, action["name"]))
            time.sleep(5)
            return 97  # the signal did not end us
        elif do == "report":
            atomic_write_text(adir / "error.json", json.dumps({
                "kind": action["kind"], "type": action.get("type", "RuntimeError"),
                "message": action.get("message", ""), "traceback": action.get("traceback", ""),
                "epoch": 0, "step": step, "errno": action.get("errno"),
            }))
            return int(action.get("exit", 3))
        elif do == "fill":
            with open(run.path / action["name"], "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
                try:
                    while True:
                        f.write(b"\0" * 512)  # the last blocks
                except OSError:
                    pass
        elif do == "plant":
            (run.path / action["path"]).mkdir(parents=True)
            (run.path / action["path"] / "weights.bin").write_bytes(b"partial")
        elif do == "result":
            plan = json.loads(run.plan_json.read_text())
            epochs = int(action.get("epochs", 1))
            atomic_write_text(run.result_json, json.dumps({
                "history": {"loss": [0.5] * epochs, "batch_size": [plan["batch_size"]] * epochs},
                "epochs_done": list(range(epochs)), "global_step": step, "attempt": args.attempt,
            }))
            return 0
        elif do == "exit":
            return int(action["code"])
        else:
            print(f"fake_worker: unknown action {do!r}", file=sys.stderr, flush=True)
            return 96
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
