"""Published Qwen3.5 / RynnBrain 1.1 architectures as config.json-shaped dicts (meta builds, planning).

Filled from the published config.json files (see each entry's source); none yet."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {}
PUBLISHED_PARAMS: dict[str, dict[str, float]] = {}
