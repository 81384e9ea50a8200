"""The one resolver from a recipe's ``model`` section to the architecture (the family's args, through the
model registry ``rynnscale.models``), used by recipe validation, the model build (``rynnscale.train.build``)
and the planner.

Sources, in order: ``model.init_from``'s ``config.json`` when it is on this machine (and then a
``model.preset`` must describe the same model); else ``model.preset`` (planning a run whose weights
live elsewhere); else the inline ``model.arch``. Errors are ``ConfigError`` naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rynnscale.config.schema import ConfigError, ModelConfig
from rynnscale.models import (
    ArchConfigError,
    HFCheckpointError,
    ModelSpec,
    args_from_hf_config,
    family_of,
    preset_config,
    presets,
    read_hf_config,
)


@dataclass(frozen=True)
class ResolvedArch:
    args: Any            # the family's args (``rynnscale.models.spec.ModelArgs``)
    source: str          # where the architecture came from, for logs and plans

    @property
    def family(self) -> ModelSpec:
        return family_of(self.args)


def resolve_model_args(m: ModelConfig, *, check_paths: bool = True, required: bool = True) -> ResolvedArch | None:
    """``model.*`` -> ``ResolvedArch``. ``check_paths=False`` (planning off-cluster) accepts an
    ``init_from`` that is not on this machine when ``model.preset`` names its architecture; with
    ``required=False`` as well, an unknowable architecture (such an ``init_from``, no preset: e.g. a
    fine-tune of a base run that has not happened yet) gives None instead of an error."""
    if (m.init_from is None) == (m.arch is None):
        raise ConfigError("set exactly one of 'model.init_from' (a local Hugging Face directory) and 'model.arch' "
                          f"(an inline architecture); got init_from={m.init_from!r}, "
                          f"arch={'set' if m.arch is not None else 'unset'}")
    if m.preset is not None:
        if m.preset not in presets():
            raise ConfigError(f"config key 'model.preset' = {m.preset!r} is not allowed; choose one of "
                              f"{sorted(presets())}")
        if m.arch is not None:
            raise ConfigError("'model.preset' names the architecture of 'model.init_from'; it cannot be combined "
                              "with an inline 'model.arch'")
    if m.arch is not None:
        try:
            return ResolvedArch(args_from_hf_config(dict(m.arch), strict=True, where="model.arch"),
                                "inline model.arch")
        except ArchConfigError as e:
            raise ConfigError(f"config key {e}") from None
    if (Path(m.init_from) / "config.json").is_file():
        try:
            args = read_hf_config(m.init_from)[0]
        except (HFCheckpointError, ArchConfigError) as e:
            raise ConfigError(f"config key 'model.init_from' = {m.init_from!r}: {e}") from None
        if m.preset is not None and args != args_from_hf_config(preset_config(m.preset)):
            raise ConfigError(f"config key 'model.preset' = {m.preset!r} does not describe the model in "
                              f"'model.init_from' = {m.init_from!r} (their architectures differ); fix or "
                              "remove the preset")
        return ResolvedArch(args, f"{m.init_from}/config.json")
    if check_paths:
        raise ConfigError(f"config key 'model.init_from' = {m.init_from!r}: no config.json there "
                          "(expected a local Hugging Face checkpoint directory)")
    if m.preset is not None:
        return ResolvedArch(args_from_hf_config(preset_config(m.preset), strict=True, where=f"preset {m.preset}"),
                            f"preset {m.preset}")
    if not required:
        return None
    raise ConfigError(f"model.init_from={m.init_from!r} has no config.json on this machine and no 'model.preset' "
                      f"names its architecture; set model.preset (one of {sorted(presets())})")
