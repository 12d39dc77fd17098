"""Corpus-level decisions, taken over every shard of a job at once: routing scores, thresholds and their
diagnostics (route, routing, decide, diagnostics, attribution), DRIFT's per-group weights (weights),
IRFT's preference pairs (pairs)."""
