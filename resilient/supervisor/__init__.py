"""The caller's side of the process boundary: runs each attempt in a worker subprocess and decides
what happens after it. Nothing here imports TensorFlow or Keras.

- ``loop.py``      ``Supervisor.run()``: the state machine START -> MONITOR -> CLASSIFY -> DEGRADE ->
                   RESTART | FINISH | GIVE_UP, one small method per state
- ``process.py``   ``WorkerProcess``: spawn, memory cgroup, output, channel, memory samples, kills
                   -> ``AttemptEnd``
- ``classify.py``  pure: the evidence of a finished attempt -> an incident kind
- ``decide.py``    pure: the classified attempt, plan, policy, plan search, incidents -> ``Decision``;
                   the restart rules as tenacity strategies
- ``startup.py``   pure: a worker's start-up phases (import, restore, first step) and their calibrated
                   hang timeouts
- ``report.py``    the root-cause report, the user-error message, the latest checkpoint
- ``config.py``    ``SupervisorConfig``
- ``memory.py``, ``gpu.py``  host memory (cgroups, private RSS) and GPU memory (NVML)
"""
