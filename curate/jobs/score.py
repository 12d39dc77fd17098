"""`curate.score(...)`: prism's per-shard stages (tokenize, probe) without routing or an output folder:
the per-example columns as one table, cached in a work folder like a prism run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import concentration, schema
from curate.config import PrismConfig
from curate.io import folders
from curate.io.atomic import clean_stale_temps, read_arrow
from curate.jobs.prism import PrismJob

RECORD_COLUMNS = ("id", "source", "source_index", "format")
TOKEN_COLUMNS = ("n_tokens", "n_loss_tokens", "truncated", "token_error")


class ScoreJob(PrismJob):
    """Prism's per-shard stages only: no signal stages, no corpus step."""

    def signals(self):
        return []


def score_table(inputs: list[str], work: Path, options: dict):
    """The per-example columns of `inputs` (see curate.api.score) as a datasets.Dataset, the stages
    cached in `work` (locked while they run). ValueError for bad options, curate's input errors as the
    command line has them."""
    import datasets

    cfg = PrismConfig(input=inputs, out=str(work / "out"), work=str(work), **options)
    job = ScoreJob(cfg)
    job.check()
    folders.check_paths(None, cfg.work_dir, cfg.input)
    folders.claim_work(cfg.work_dir)
    with folders.locked(cfg.work_dir / folders.LOCK_SUFFIX, cfg.work_dir, "--work"):
        clean_stale_temps(cfg.work_dir)
        run = job.run_stages()
    tables = [_shard_table(ing["path"], tok["path"], prb["path"], cfg.seed)
              for ing, tok, prb in zip(run.ingest["shards"], run.shards["tokenize"], run.shards["probe"])]
    return datasets.Dataset(pa.concat_tables(tables) if tables else _empty())


def _shard_table(ing: str, tok: str, prb: str, seed: int) -> pa.Table:
    records, tokens, probe = read_arrow(ing, list(RECORD_COLUMNS)), read_arrow(tok, list(TOKEN_COLUMNS)), read_arrow(prb)
    scored = pc.is_valid(probe.column("grad_norms")).to_numpy(zero_copy_only=False)
    random = np.zeros(records.num_rows, np.float32)
    random[scored] = concentration.random_control(records.column("id").filter(scored).to_pylist(), seed)
    columns = {**{c: records.column(c) for c in RECORD_COLUMNS}, **{c: tokens.column(c) for c in TOKEN_COLUMNS},
               **{c: probe.column(c) for c in probe.column_names}, "random": pa.array(random, mask=~scored)}
    return pa.table(columns)


def _empty() -> pa.Table:
    routed = schema.arrow_schema(schema.ROUTED)
    fields = [routed.field(c) for c in (*RECORD_COLUMNS, *TOKEN_COLUMNS[:3])] + [pa.field("token_error", pa.string())]
    fields += [routed.field(c) for c in (*schema.PROBE_COLUMNS, *schema.METRICS)]
    return pa.schema(fields).empty_table()
