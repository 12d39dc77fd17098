"""Ingest: input files -> canonical records in shards, bad records quarantined (ingest), the JSON-line
chunks it parses (chunks) and the helper processes that parse them in parallel (pool)."""
