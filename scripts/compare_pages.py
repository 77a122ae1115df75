"""Compose the same shoppers' pages with no time budget (one at a time, then a batch) and write what
a shopper sees (titles, items, reasons, path) and each single page's seconds, for comparing two
commits. Usage, from the repository root (another commit's code: its checkout in OLD):

    python scripts/compare_pages.py OUT.json
    OLD=/path/to/checkout python scripts/compare_pages.py OUT-old.json
"""

import json
import os
import sys
import time

sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd(), os.path.dirname(os.path.abspath(__file__)))]
if os.environ.get("OLD"):
    sys.path.insert(0, os.environ["OLD"])

from agent.service import build_composer  # noqa: E402
from agent.settings import Settings  # noqa: E402
from homepage.cli import _users_and_items  # noqa: E402

settings = Settings(budget_ms=None, warm_up=False)
users = [*_users_and_items(settings)[0][:16], "new-visitor-1", "new-visitor-2"]
composer = build_composer(settings)


def seen(page):
    return {"user": page.user_id, "path": page.meta.path,
            "modules": [{"title": m.title, "items": [(i.item_id, i.reason) for i in m.items]} for m in page.modules]}


out, seconds = {"single": []}, []
for user in users:
    started = time.perf_counter()
    out["single"].append(seen(composer.compose(user, use_cache=False)))
    seconds.append(time.perf_counter() - started)
out["batch"] = [seen(p) for p in composer.compose_batch(users[:8], batch_size=4)]
out["seconds"] = sorted(seconds)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
print(f"median {sorted(seconds)[len(seconds) // 2]:.2f} s a page; code from {sys.modules['agent'].__file__}")
