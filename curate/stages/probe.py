"""Stage `probe`: PRISM's gradient statistics under the frozen probe model.

Examples are sorted by length and packed into batches of at most `batch_tokens` padded tokens, so a
batch wastes little on padding; results go back to input order. Batch composition never changes a
number beyond float32 rounding (see curate.gradients), which is why batch_tokens and device are not
part of the cache key."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from curate import gradients, models, roles, schema
from curate.batching import right_pad, token_batches
from curate.corpus import route
from curate.io.atomic import read_arrow
from curate.stages.base import MODEL_LIBRARIES, Stage
from curate.stages.configs import resolved_dtype

# Bumped when the architecture map changes what an entry measures: older probe shards are recomputed.
ROLE_MAP_VERSION = 2
# Bumped when the probe's numerics change for some model: 2, backward with autocast off (under bf16/fp16,
# an op a model runs in fp32 on purpose, such as Falcon's attention matmuls, was lowered in backward).
NORMS_VERSION = 2
# autocast dtype of each --dtype; tf32 keeps fp32 tensors and lets CUDA matmuls use TF32
DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_at(dtype: str, model, rmap: roles.RoleMap, input_ids, attention, loss_mask) -> gradients.ProbeResult:
    """gradients.probe_batch at the resolved --dtype `dtype`: autocast for bf16/fp16, TF32 CUDA matmuls for
    tf32, plain fp32 (TF32 off, whatever the process's setting) for fp32."""
    gradients.plain_head(model)  # its one-time logits comparison in full fp32, never under tf32 below
    with gradients.tf32_matmuls(dtype == "tf32"):
        return gradients.probe_batch(model, rmap, input_ids, attention, loss_mask, DTYPES[dtype])


class Probe(Stage):
    """PRISM's probe per shard: mean NLL per target token (nats), per-entry gradient norms (list<float32>,
    RoleMap order), their L2 total and the NORM_METRICS; null for rows with a token_error."""

    name = "probe"
    libraries = MODEL_LIBRARIES
    runs_model = True
    version = {"role_map": ROLE_MAP_VERSION, "norms": NORMS_VERSION}
    reads = ("input_ids", "loss_mask", "token_error")
    writes = pa.schema([("probe_loss", pa.float32()), ("grad_norms", pa.list_(pa.float32())),
                        ("grad_norm_total", pa.float32())] + [(m, pa.float32()) for m in schema.NORM_METRICS])

    cost_unit = "tok"

    def cost(self, source: str) -> int:
        """Tokens to probe in the tokenize shard `source`."""
        tokens = read_arrow(source, ["n_tokens", "token_error"])
        return int(pc.sum(tokens.column("n_tokens").filter(pc.is_null(tokens.column("token_error")))).as_py() or 0)

    def role_map(self, model) -> roles.RoleMap:
        """The architecture map of `model` for this config's modules and allow_partial (NotCovered or
        ValueError when the map cannot be built)."""
        return roles.role_map(model, tuple(self.config.modules), self.config.allow_partial)

    def describe(self) -> dict:
        """The grad_norms order (entry names, layer by layer) and the role map behind it."""
        c = self.config
        rmap = self.role_map(models.skeleton(models.resolve(c.model, c.trust_remote_code)))
        return {"modules": rmap.names, "probe_map": rmap.describe()}

    def run(self, shard: pa.Table) -> pa.Table:
        c = self.config
        device = models.resolve_device(c.device)
        model = models.load_model(models.resolve(c.model, c.trust_remote_code), device)
        rmap = self.role_map(model)
        dtype = resolved_dtype(c.dtype)
        ids = shard.column("input_ids").to_pylist()
        masks = shard.column("loss_mask").to_pylist()
        valid = [i for i, err in enumerate(shard.column("token_error").to_pylist()) if err is None]
        loss = np.full(len(ids), np.nan, dtype=np.float32)
        sq = np.full((len(ids), len(rmap.entries)), np.nan, dtype=np.float64)
        bar = tqdm(total=len(valid), desc="probe", unit="ex", leave=False)
        start, n_tok = time.perf_counter(), 0
        for batch in token_batches([len(ids[i]) for i in valid], c.batch_tokens):
            rows = [valid[b] for b in batch]
            input_ids, attention, loss_mask = right_pad([ids[r] for r in rows], [masks[r] for r in rows], device)
            res = probe_at(dtype, model, rmap, input_ids, attention, loss_mask)
            loss[rows] = res.loss.cpu().numpy()
            sq[rows] = res.sq_norms.double().cpu().numpy()
            n_tok += int(attention.sum())
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - start):.0f}")
        bar.close()
        norms = np.sqrt(sq)
        total = np.sqrt(sq.sum(axis=1))
        out = pa.table({
            "probe_loss": pa.array(loss, mask=np.isnan(loss)),
            "grad_norms": pa.array([None if np.isnan(r[0]) else r.astype(np.float32) for r in norms],
                                   type=pa.list_(pa.float32())),
            "grad_norm_total": pa.array(total.astype(np.float32), mask=np.isnan(total)),
        })
        for name, column in route.norm_metric_columns(out.column("grad_norms")).items():
            out = out.append_column(name, column)
        return self.check(shard, out)
