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
dtfd       :class:`DTFD` (DTFD-MIL, seeded split) ``"instance/{C-1}"``
mhim       :class:`MHIM` (MHIM-MIL student)       ``"attention"`` / ``"layer1/mean"``
dsmil      :class:`DSMIL` (and AEM's copy)        ``"class/{positive class}"``
ins        :class:`INS` (instance classifier)     ``"instance/1"`` (instance scores)
packmil    :class:`PackMIL` (ABMIL/TransMIL agg.) ``"attention"`` / ``"layer2/mean"``
mambamil   :class:`MambaMIL` (SR/Bi/plain Mamba)  ``"attention"``
========== ====================================== =========================================

Aliases: ``aem`` -> ``abmil`` (gated), ``aem_mha`` -> ``mha``, ``mhim_abmil`` / ``mhim_transmil``
/ ``mhim_dsmil`` -> ``mhim`` (backbone ``attn`` / ``selfattn`` / ``dsmil``).
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
from .dsmil import DSMIL
from .dtfd import DTFD
from .ins import INS
from .mambamil import MambaMIL
from .mhim import MHIM
from .packmil import PackMIL
from .transmil import TransMIL

__all__ = [
    "ABMIL",
    "ACMIL_GA",
    "ACMIL_MHA",
    "ALIASES",
    "CLAM_MB",
    "CLAM_SB",
    "DSMIL",
    "DTFD",
    "INS",
    "MHA",
    "MHIM",
    "MODELS",
    "MILModel",
    "MILOutput",
    "MambaMIL",
    "ModelCard",
    "PackMIL",
    "TransMIL",
    "available_models",
    "build_from_state_dict",
    "build_model",
    "detect_arch",
    "register_alias",
    "register_model",
    "resolve_arch",
]
