"""Typed run configuration: schema dataclasses + YAML/dotlist loading with validation."""

from .load import ConfigError, load_config, save_resolved, stage_config, to_yaml, validate
from .schema import RootConfig

__all__ = ["ConfigError", "RootConfig", "load_config", "save_resolved", "stage_config", "to_yaml", "validate"]
