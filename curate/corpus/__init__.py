"""Corpus-level decisions, taken over every shard of a job at once: routing scores and the threshold
(route, routing), DRIFT's per-group weights (weights), IRFT's preference pairs (pairs)."""
