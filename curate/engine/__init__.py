"""The engine every job runs on: per-shard stages cached and resumed (shards), where they run
(executors), and how a job's output folder is built and switched in (outputs)."""
