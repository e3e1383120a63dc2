"""Completion windows as deadlines: a batch predicted to miss its window is moved up, and one that
would miss it even first is reported long before it expires.

Every plan predicts each open batch's completion (`batches_predicted_s`). A batch whose predicted
completion falls after its deadline (the gateway's `expires_at`) becomes *urgent*: its model queues
serve it before the fair order (`queues.ModelQueues.urgent`) and the next plan orders its requests
first, so that plan predicts it moved up (event `deadline_at_risk`). If a plan made with it moved up
still predicts it late, it cannot make it whatever runs first (event `deadline_miss_predicted`,
once). Urgency is kept once given: a batch that is back on time because it was moved up would
fall behind again if it were moved back.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from runtime.executor.pool_state import Req


class Deadlines:
    def __init__(self) -> None:
        self.due: dict[str, float] = {}  # batch -> deadline (unix seconds, the executor clock's time)
        self.urgent: set[str] = set()  # shared with the model queues
        self._moved_at_plan: dict[str, int] = {}  # batch -> plan number that moved it up
        self._reported: set[str] = set()

    def add(self, batch_id: str, deadline_at: float | None) -> None:
        if deadline_at is not None:
            self.due[batch_id] = deadline_at

    def forget(self, batch_id: str) -> None:
        self.due.pop(batch_id, None)
        self.urgent.discard(batch_id)
        self._moved_at_plan.pop(batch_id, None)
        self._reported.discard(batch_id)

    def first(self, reqs: Iterable[Req]) -> list[Req]:
        """`reqs` with the urgent batches' requests first (stable): the order the planner sees."""
        reqs = list(reqs)
        if not self.urgent:
            return reqs
        return sorted(reqs, key=lambda r: r.batch_id not in self.urgent)

    def check(self, now: float, plan_no: int, predicted: Mapping[str, float]
              ) -> list[tuple[str, str, dict[str, Any]]]:
        """After a plan made at `now` (unix s), numbered `plan_no`: (event, batch, data) to emit."""
        out = []
        for batch, left_s in predicted.items():
            due = self.due.get(batch)
            if due is None or now + left_s <= due:
                continue
            data = {"predicted_completion_at": round(now + left_s, 3), "deadline_at": due,
                    "late_s": round(now + left_s - due, 3)}
            if batch not in self.urgent:
                self.urgent.add(batch)
                self._moved_at_plan[batch] = plan_no
                out.append(("deadline_at_risk", batch, {**data, "moved_up": True}))
            elif plan_no > self._moved_at_plan[batch] and batch not in self._reported:
                self._reported.add(batch)  # planned with it first, and still late
                out.append(("deadline_miss_predicted", batch, data))
        return out
