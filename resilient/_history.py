"""History: what ``resilient.fit`` returns, shaped like ``keras.callbacks.History``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._incident import Incident
from ._plan import Plan


class History:
    """Per-epoch metrics of the whole run (all attempts), plus what resilient did along the way.

    Attributes:
        history: ``{"loss": [...], "val_loss": [...], ...}``, one value per epoch.
        epoch: the epoch indices trained, ``[0, 1, ...]``.
        incidents: every classified failure, in order.
        plan: the Plan in force at the end.
        run_dir: where checkpoints, journal and logs live.
        params: as Keras's ``History.params``: ``{"verbose": ..., "epochs": ..., "steps": ...}``
            (``steps`` per epoch of the plan in force at the end; None for a run finished by an older release).
        model: the trained model (see below).
    """

    def __init__(
        self,
        history: dict[str, list[float]],
        epoch: list[int],
        incidents: list[Incident],
        plan: Plan,
        run_dir: Path,
        model: Any = None,
        loader: Any = None,
    ) -> None:
        self.history = history
        self.epoch = epoch
        self.incidents = incidents
        self.plan = plan
        self.run_dir = Path(run_dir)
        self._model = model
        self._loader = loader
        self.params: dict[str, Any] = {}

    @property
    def model(self) -> Any:
        """The trained model: the caller's own, or (for a builder) one built and loaded on first access."""
        if self._model is None and self._loader is not None:
            self._model = self._loader()
        return self._model

    def report(self, path: str | Path | None = None) -> Path:
        """Write the run's self-contained HTML report to ``path`` (default ``run_dir/report.html``), the curves as
        a PNG beside it; returns the HTML's path. Needs matplotlib: ``pip install 'resilient[report]'``."""
        from ._report import build_report

        return build_report(self.run_dir, path)

    def __repr__(self) -> str:
        return (
            f"History(epochs={len(self.epoch)}, incidents={[i.kind for i in self.incidents]}, "
            f"plan={self.plan.describe()!r}, run_dir='{self.run_dir}')"
        )
