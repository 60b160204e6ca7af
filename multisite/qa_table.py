"""The rows of the campaign's QA table, shared by the generic checks and the demo's science checks."""

from __future__ import annotations

__all__ = ("QARow",)

from dataclasses import dataclass


@dataclass
class QARow:
    """One line of the QA table."""

    check: str
    dataset_type: str
    data_id: str
    site: str
    status: str
    value: float | None = None
    detail: str = ""
