"""Model families behind one seam (``spec.ModelSpec``), found through the registry by transformers'
``model_type``. Code outside this package imports from here (or ``spec`` / ``stats`` / ``lora`` /
``generate`` / ``mrope``), never from a family's package."""

from rynnscale.models.registry import (
    args_from_hf_config,
    families,
    family,
    family_of,
    preset_config,
    presets,
    published_params,
    read_hf_config,
    register,
    supported_model_types,
    unregister,
)
from rynnscale.models.spec import (
    ArchConfigError,
    DataContract,
    HFCheckpointError,
    ModelOutput,
    ModelSpec,
    StateDictAdapter,
    VisionGeometry,
)

__all__ = [
    "ArchConfigError", "DataContract", "HFCheckpointError", "ModelOutput", "ModelSpec", "StateDictAdapter",
    "VisionGeometry", "args_from_hf_config", "families", "family", "family_of", "preset_config", "presets",
    "published_params", "read_hf_config", "register", "supported_model_types", "unregister",
]
