"""MIL models with official state_dict names and named attention sources.

Qt-free; torch is imported here. Architectures (``available_models()``):

========== ====================================== =========================================
name       class                                  default attention source
========== ====================================== =========================================
abmil      :class:`ABMIL` (gated or plain)        ``"attention"``
clam_sb    :class:`CLAM_SB`                       ``"attention"``
clam_mb    :class:`CLAM_MB`                       ``"class/{predicted class}"``
acmil_ga   :class:`ACMIL_GA`                      ``"branch/mean"``
acmil_mha  :class:`ACMIL_MHA`                     ``"branch/mean"``
mha        :class:`MHA` (ACMIL/AEM single query)  ``"head/mean"``
transmil   :class:`TransMIL`                      ``"layer2/mean"``
mambamil   :class:`MambaMIL` (SR/Bi/plain Mamba)  ``"attention"``
========== ====================================== =========================================

Aliases: ``aem`` -> ``abmil`` (gated), ``aem_mha`` -> ``mha``.
"""

from .abmil import ABMIL
from .acmil import ACMIL_GA, ACMIL_MHA, MHA
from .base import (
    ALIASES,
    MODELS,
    MILModel,
    MILOutput,
    ModelCard,
    available_models,
    build_from_state_dict,
    build_model,
    detect_arch,
    register_alias,
    register_model,
    resolve_arch,
)
from .clam import CLAM_MB, CLAM_SB
from .mambamil import MambaMIL
from .transmil import TransMIL

__all__ = [
    "ABMIL",
    "ACMIL_GA",
    "ACMIL_MHA",
    "ALIASES",
    "CLAM_MB",
    "CLAM_SB",
    "MHA",
    "MODELS",
    "MILModel",
    "MILOutput",
    "MambaMIL",
    "ModelCard",
    "TransMIL",
    "available_models",
    "build_from_state_dict",
    "build_model",
    "detect_arch",
    "register_alias",
    "register_model",
    "resolve_arch",
]
