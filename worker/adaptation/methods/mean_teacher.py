"""`mean_teacher`: simple-SFOD's mean teacher for detectors (catalog/detection.py). The EMA teacher labels
the weak view, the student learns those labels on the strong view with the detector's own losses."""
from __future__ import annotations

from app.contract.catalog.detection import MeanTeacherParams

from ._detection import MeanTeacherBase
from .registry import implements


@implements(MeanTeacherParams)
class MeanTeacher(MeanTeacherBase):
    pass
