"""Saved plans as JSON files next to the cache database, so a restarted app or a lost database keeps them.

The app's Allocate, Search and Export pages save plans by name; each is also written to
`<cache>/plans/<name>.json` (atomically), and a new browser session starts with the plans found
there. Names are kept to letters, digits, `.`, `_` and `-` so a name can never point outside the
folder. Files that are not valid plans are skipped, never deleted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from engine.compression.plan import RankPlan
from engine.errors import RankScopeError

PLANS_FOLDER = "plans"


def plan_file_name(name: str) -> str:
    """A file name for a plan name: unsafe characters become '-' (e.g. 'a/b c' -> 'a-b-c.json')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "plan"
    return f"{slug}.json"


class PlanShelf:
    """The saved plans of one cache folder."""

    def __init__(self, cache_dir: Path):
        self.folder = Path(cache_dir) / PLANS_FOLDER

    def save(self, name: str, plan: RankPlan) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / plan_file_name(name)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(plan.to_json())
        os.replace(partial, path)
        return path

    def load(self) -> dict[str, RankPlan]:
        """Every readable plan on the shelf, by name (the file name without `.json`), oldest first."""
        plans = {}
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                plans[path.stem] = RankPlan.load(path)
            except (RankScopeError, OSError, ValueError):  # a PlanError, or a PruningError in a v2 section
                continue
        return plans
