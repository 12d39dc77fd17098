"""`curate prism` end to end with a tiny random Llama (fast): outputs, counts, cache, re-route, exactness."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch

from curate import chat, concentration, models
from curate.cli import main
from curate.io.atomic import read_arrow, write_arrow
from curate.schema import load_json_schema
from tests.test_gradients import naive_norms


@pytest.fixture
def raw_dir(tmp_path, real_data):
    raw = tmp_path / "raw"
    raw.mkdir()
    gsm = (real_data / "gsm8k" / "train.lines1-2000.jsonl").read_text().splitlines()[:6]
    alf = (real_data / "alfworld_knowagent_trajs" / "KnowAgentALFWorld_llama-2-13b_D0.even_tasks.jsonl"
           ).read_text().splitlines()[:3]
    bad = ['{"question": "truncated', json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
           gsm[0]]  # the last one is an exact duplicate of a GSM8K record
    (raw / "gsm8k.jsonl").write_text("\n".join(gsm) + "\n")
    (raw / "sub").mkdir()
    (raw / "sub" / "alfworld.jsonl").write_text("\n".join(alf) + "\n")
    (raw / "sub" / "bad.jsonl").write_text("\n".join(bad) + "\n")
    return raw


def prism(raw_dir, out, model, *extra):
    return main(["prism", "--input", str(raw_dir), "--out", str(out), "--model", model,
                 "--max-length", "384", "--batch-tokens", "1024", "--shard-size", "4", *extra])


def load(out, part):
    files = sorted((out / part).glob("*.arrow"))
    return pa.concat_tables([read_arrow(f) for f in files]) if files else None


def test_prism_end_to_end(raw_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "routed"
    assert prism(raw_dir, out, tiny_model_dir) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    contract = load_json_schema("prism_manifest")
    assert set(contract["required"]) <= set(manifest)
    assert set(contract["properties"]["counts"]["required"]) <= set(manifest["counts"])
    c = manifest["counts"]
    assert c == {**c, "input": 12, "duplicates": 1, "quarantined": 2, "sft": 5, "rl": 4}
    assert c["input"] == c["sft"] + c["rl"] + c["quarantined"] + c["duplicates"]
    assert sorted(os.listdir(out)) == [".work", "manifest.json", "quarantine", "report.html", "rl", "sft"]
    assert all(f.suffix == ".arrow" for p in ("sft", "rl") for f in (out / p).iterdir())

    quarantine = [json.loads(x) for x in (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
    assert [(q["source"].endswith("bad.jsonl"), q["source_index"]) for q in quarantine] == [(True, 0), (True, 1)]
    assert "malformed JSON" in quarantine[0]["reason"] and "assistant" in quarantine[1]["reason"]

    sft, rl = load(out, "sft"), load(out, "rl")
    rows = pa.concat_tables([sft, rl]).to_pylist()
    assert {r["route"] for r in sft.to_pylist()} == {"sft"} and {r["route"] for r in rl.to_pylist()} == {"rl"}
    thr = manifest["routing"]["threshold"]
    assert max(sft.column("score").to_pylist()) <= thr < min(rl.column("score").to_pylist())
    assert all(len(r["grad_norms"]) == 14 == len(manifest["modules"]) for r in rows)
    assert all(r["score"] == r["gini"] for r in rows)
    first = next(r for r in rows if r["source"].endswith("gsm8k.jsonl") and r["source_index"] == 0)
    assert first["ground_truth"] == "72" and first["prompt"] == first["messages"][:1]
    alf = [r for r in rows if "alfworld" in r["source"]]
    assert len(alf) == 3 and all(r["reward"] in (0.0, 1.0) for r in alf)


def test_output_norms_equal_naive_autograd(raw_dir, tmp_path, tiny_model_dir):
    """The whole path (ingest, chat template, padding, batching, shards) against one-example autograd."""
    out = tmp_path / "routed"
    prism(raw_dir, out, tiny_model_dir)
    ref = models.resolve(tiny_model_dir)
    tok, model = models.load_tokenizer(ref), models.load_model(ref, "cpu")
    rows = pa.concat_tables([load(out, "sft"), load(out, "rl")]).to_pylist()
    for row in rows[:4]:
        enc = chat.encode(tok, row["messages"], 384)
        loss, norms = naive_norms(model, enc.input_ids, enc.loss_mask)
        assert row["probe_loss"] == pytest.approx(loss, rel=1e-4)
        torch.testing.assert_close(torch.tensor(row["grad_norms"], dtype=torch.float64), norms, rtol=1e-4, atol=0)
        # the first token is never predicted: no target, even where truncation leaves an assistant token there
        assert row["n_tokens"] == len(enc.input_ids) and row["n_loss_tokens"] == sum(enc.loss_mask[1:])


def test_rerun_is_a_cache_hit_with_identical_bytes(raw_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "routed"
    prism(raw_dir, out, tiny_model_dir)
    before = {p: p.read_bytes() for p in sorted(out.glob("[sr]*/*.arrow"))}
    probe_files = {p: p.stat().st_mtime_ns for p in (out / ".work" / "probe").glob("*.arrow")}
    prism(raw_dir, out, tiny_model_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"]["probe"]["computed"] == 0 and manifest["cache"]["tokenize"]["computed"] == 0
    assert {p: p.read_bytes() for p in sorted(out.glob("[sr]*/*.arrow"))} == before
    assert {p: p.stat().st_mtime_ns for p in (out / ".work" / "probe").glob("*.arrow")} == probe_files

    # a different batch size packs other batch mates: the same numbers up to float32 summation order
    out2 = tmp_path / "again"
    prism(raw_dir, out2, tiny_model_dir, "--batch-tokens", "300")
    for part in ("sft", "rl"):
        a, b = load(out, part), load(out2, part)
        assert a.column("id").to_pylist() == b.column("id").to_pylist()
        np.testing.assert_allclose(np.array(b.column("grad_norms").to_pylist()),
                                   np.array(a.column("grad_norms").to_pylist()), rtol=1e-5)


def test_reroute_uses_cached_gradients(raw_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "routed"
    prism(raw_dir, out, tiny_model_dir)
    probe_files = {p: p.stat().st_mtime_ns for p in (out / ".work" / "probe").glob("*.arrow")}
    out2 = tmp_path / "by_cv"
    assert main(["route", "--work", str(out / ".work"), "--out", str(out2), "--metric", "cv",
                 "--quantile", "0.25", "--reverse"]) == 0
    rows = pa.concat_tables([load(out2, "sft"), load(out2, "rl")]).to_pylist()
    assert all(r["score"] == r["cv"] for r in rows)
    assert sum(r["route"] == "rl" for r in rows) == 3  # quantile 0.25 of 9 -> 3 low scores, reversed to rl
    assert {p: p.stat().st_mtime_ns for p in (out / ".work" / "probe").glob("*.arrow")} == probe_files


def test_probe_stores_the_norm_metrics_and_routing_without_them_is_the_same(raw_dir, tmp_path, tiny_model_dir):
    """The probe stage writes gini/cv/kurtosis/magnitude beside its norms; routing reads them. An older
    cache without them is routed to the same bytes (route computes them), for every metric."""
    out = tmp_path / "routed"
    prism(raw_dir, out, tiny_model_dir)
    probe_files = sorted((out / ".work" / "probe").glob("*.arrow"))
    for f in probe_files:
        t = read_arrow(f)
        valid = t.filter(pa.compute.is_valid(t.column("grad_norms")))
        norms = np.array(valid.column("grad_norms").to_pylist(), np.float64)
        for name, fn in (("gini", concentration.gini), ("cv", concentration.cv),
                         ("kurtosis", concentration.kurtosis), ("magnitude", concentration.magnitude)):
            np.testing.assert_allclose(valid.column(name).to_numpy(), fn(norms), rtol=1e-6)
        assert t.column("gini").null_count == t.column("grad_norms").null_count
    for metric in ("gini", "kurtosis"):
        with_metrics = tmp_path / f"with-{metric}"
        assert main(["route", "--work", str(out / ".work"), "--out", str(with_metrics), "--metric", metric]) == 0
        old_cache = tmp_path / f"old-cache-{metric}"
        shutil.copytree(out / ".work", old_cache)
        state = json.loads((old_cache / "state.json").read_text().replace(str(out / ".work"), str(old_cache)))
        for i, f in enumerate(sorted((old_cache / "probe").glob("*.arrow"))):
            t = read_arrow(f)
            sha = write_arrow(f, t.select(["probe_loss", "grad_norms", "grad_norm_total"]))
            # as that older run committed them: its markers and state hold the files' own sha256
            marker = f.with_suffix(".done.json")
            marker.write_text(json.dumps({**json.loads(marker.read_text()), "sha256": sha}))
            state["probe"][i]["sha256"] = sha
        (old_cache / "state.json").write_text(json.dumps(state))
        without = tmp_path / f"without-{metric}"
        assert main(["route", "--work", str(old_cache), "--out", str(without), "--metric", metric]) == 0
        for part in ("sft", "rl"):
            a = sorted((with_metrics / part).glob("*.arrow"))
            assert a and [f.read_bytes() for f in a] == [(without / part / f.name).read_bytes() for f in a]


def test_reroute_from_another_directory(raw_dir, tmp_path, tiny_model_dir, monkeypatch):
    """A run started with relative paths can be re-routed from elsewhere: state.json holds absolute paths."""
    monkeypatch.chdir(tmp_path)
    prism(raw_dir, "routed", tiny_model_dir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["route", "--work", "../routed/.work", "--out", "again"]) == 0
    for part in ("sft", "rl"):
        assert load(tmp_path / "elsewhere" / "again", part).equals(load(tmp_path / "routed", part))


def test_truncation_is_counted_and_keeps_the_replies(tmp_path, tiny_model_dir):
    raw = tmp_path / "raw.jsonl"
    long_tail = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short answer"},
                              {"role": "user", "content": "observation " * 200}]}
    fits = {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2 " * 50}]}
    raw.write_text(json.dumps(long_tail) + "\n" + json.dumps(fits) + "\n")
    out = tmp_path / "routed"
    assert main(["prism", "--input", str(raw), "--out", str(out), "--model", tiny_model_dir,
                 "--max-length", "64"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    # the long observation after the reply goes first, so the reply is kept and routed, whole: only the
    # other record lost the start of its context
    assert m["counts"]["truncated"] == 1 and m["counts"]["quarantined"] == 0
    assert m["counts"]["sft"] + m["counts"]["rl"] == 2


def test_unreadable_file_is_an_input_error(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert main(["prism", "--input", str(bad), "--out", str(tmp_path / "o"), "--model", tiny_model_dir]) == 2
    assert "broken.parquet" in capsys.readouterr().err


def test_dask_workers_write_the_same_bytes(raw_dir, tmp_path, tiny_model_dir):
    local, dask = tmp_path / "local", tmp_path / "dask"
    prism(raw_dir, local, tiny_model_dir)
    assert prism(raw_dir, dask, tiny_model_dir, "--workers", "2") == 0
    files = lambda out: {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("[sr]*/*.arrow"))}
    assert files(local) and files(local) == files(dask)


def test_every_job_has_a_runner_and_the_cli_reads_choices_from_the_registries():
    from curate import cli, config
    from curate.formats.adapters import FORMATS
    from curate.formats.export import TARGETS
    from curate.jobs import CONFIGS, JOBS

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(JOBS) == set(CONFIGS) <= set(commands)
    assert all(name == job.name and job.config is CONFIGS[name] for name, job in JOBS.items())
    assert config.FORMAT_CHOICES == ("auto", *FORMATS)
    to = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["export"]._actions if a.dest == "to")
    assert tuple(to.choices) == tuple(TARGETS)
