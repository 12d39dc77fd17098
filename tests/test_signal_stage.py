"""Adding a per-record signal stage to a job: one Stage file, one line in the job's `signals`, one column
in the job's row schema (docs/ARCHITECTURE.md, "Adding a stage"). Here a toy stage is plugged into prism
and drift; its column is checked against a count made independently from each output row's messages."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pyarrow as pa
import pytest

from curate import schema
from curate.cli import main
from curate.jobs.drift import DriftJob
from curate.jobs.prism import PrismJob
from curate.stages.base import Stage
from tests.test_drift import load as load_drift
from tests.test_pipeline import load, prism, raw_dir  # noqa: F401  (fixture)


@dataclass
class RoleCountConfig:
    role: str = "assistant"


class RoleCount(Stage):
    """The toy: how many messages of one role a record has."""

    name = "role_count"
    reads = ("messages",)
    writes = pa.schema([("n_role", pa.int32())])

    def run(self, shard: pa.Table) -> pa.Table:
        counts = [sum(m["role"] == self.config.role for m in messages)
                  for messages in shard.column("messages").to_pylist()]
        return self.check(shard, pa.table({"n_role": pa.array(counts, pa.int32())}))


@pytest.fixture
def declared(tmp_path, monkeypatch):
    """The schemas with `n_role` declared in the routed and drift row schemas, as a user would add it."""
    folder = tmp_path / "schemas"
    shutil.copytree(schema.SCHEMA_DIR, folder)
    for name in (schema.ROUTED, "drift"):
        path = folder / f"{name}.schema.json"
        doc = json.loads(path.read_text())
        doc["properties"]["n_role"] = {"type": ["integer", "null"], "x-arrow": "int32"}
        path.write_text(json.dumps(doc))
    _use_schemas(monkeypatch, folder)
    yield
    monkeypatch.undo()
    _clear_schema_caches()


def _use_schemas(monkeypatch, folder):
    monkeypatch.setattr(schema, "SCHEMA_DIR", folder)
    _clear_schema_caches()


def _clear_schema_caches():
    schema.load_json_schema.cache_clear()
    schema.arrow_schema.cache_clear()


def plug(monkeypatch, job):
    """The one line a job's `signals` gains."""
    listed = job.signals
    monkeypatch.setattr(job, "signals", lambda self: listed(self) + [RoleCount(RoleCountConfig())])


def test_a_toy_signal_stage_rides_along_in_prism(raw_dir, tmp_path, tiny_model_dir, monkeypatch, declared):  # noqa: F811
    plug(monkeypatch, PrismJob)
    out = tmp_path / "out"
    assert prism(raw_dir, out, tiny_model_dir) == 0
    rows = pa.concat_tables([t for t in (load(out, "sft"), load(out, "rl")) if t is not None]).to_pylist()
    assert rows and all(r["n_role"] == sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"]["role_count"] == {"computed": 3, "cached": 0}
    assert prism(raw_dir, out, tiny_model_dir) == 0   # cached like every per-shard stage
    assert json.loads((out / "manifest.json").read_text())["cache"]["role_count"] == {"computed": 0, "cached": 3}


def alfworld(real_data, tmp_path):
    raw = tmp_path / "alf"
    raw.mkdir()
    src = real_data / "alfworld_knowagent_trajs" / "KnowAgentALFWorld_llama-2-13b_D0.even_tasks.jsonl"
    (raw / "D0.jsonl").write_text("\n".join(src.read_text().splitlines()[:5]) + "\n")
    return raw


def test_a_toy_signal_stage_rides_along_in_drift(real_data, tmp_path, monkeypatch, declared):
    plug(monkeypatch, DriftJob)
    out = tmp_path / "out"
    assert main(["drift", "--input", str(alfworld(real_data, tmp_path)), "--out", str(out), "--verifier", "recorded"]) == 0
    rows = load_drift(out)
    assert len(rows) == 5 and all(r["n_role"] == sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)


def test_an_undeclared_signal_column_is_an_error_not_a_silent_drop(real_data, tmp_path, monkeypatch, capsys):
    plug(monkeypatch, DriftJob)
    out = tmp_path / "out"
    assert main(["drift", "--input", str(alfworld(real_data, tmp_path)), "--out", str(out), "--verifier", "recorded"]) == 2
    assert "n_role are not declared in schemas/drift.schema.json" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
