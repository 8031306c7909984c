"""Raw ASGI test apps for the benchmarks (no framework, so none of its cost is measured)."""
