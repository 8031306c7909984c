"""apps.hello with ~100 MB of Python objects built at import (a model, a catalogue, a
routing table): what `--preload` shares between workers, and exec'd workers each build."""

import os

from apps.hello import app as app

ITEMS = int(os.environ.get("HEAVY_ITEMS", "270000"))
CATALOGUE = [
    {"id": i, "name": f"item-{i}", "price": i * 0.01, "tags": (i % 7, i % 11)} for i in range(ITEMS)
]
