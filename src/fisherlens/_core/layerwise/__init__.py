"""The layerwise engine: per-layer rules, call capture (shared with the Monitor) and the attribution proof."""
