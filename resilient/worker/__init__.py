"""The worker side of the process boundary: one training attempt per process (``python -m resilient.worker``).

- ``__main__``: process setup (parent-death signal, OOM score, faulthandler, SIGTERM), exit codes, error report
- ``attempt``: ``Attempt``, one training attempt: restore, build, train, report
- ``callbacks``: the Keras callbacks around the user's, and the callback list spanning per-epoch fit calls
- ``state``: what a checkpoint holds, saved and restored; ``fit`` loads the result into the caller's objects with it
- ``model``: the model rebuilt under the plan's precision, gradient accumulation or flexible input
- ``reshape``: the flexible-input config rewrite (the caller's ``fit`` asks it whether a model can be resized)
- ``faults``: rehearsed faults met through the real mechanism
- ``tensorboard``: incidents and plan changes written beside the caller's TensorBoard logs

Nothing here imports the supervisor, and the supervisor imports nothing here. Only ``state`` and
``reshape`` run in the caller's process, and they import no TensorFlow at module level.
"""
