"""What every WebSocket door writes its JSON messages as: compact, UTF-8 kept as it is, no NaN or Infinity (which
JSON has no spelling for: a bug, raised rather than sent)."""

from __future__ import annotations

import json
from typing import Any


def encode(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
