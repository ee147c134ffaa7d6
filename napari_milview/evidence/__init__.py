"""Evidence: measured localisation, faithfulness, concentration and disagreement of heatmaps
(docs/EVIDENCE.md). Qt-free."""

from __future__ import annotations

from .disagreement import disagreement
from .faithfulness import deletion_insertion, descending, what_if
from .metrics import concentration, localisation
from .report import EvidenceReport, evaluate

__all__ = ["EvidenceReport", "concentration", "deletion_insertion", "descending",
           "disagreement", "evaluate", "localisation", "what_if"]
