"""Runs that share folders, curate acting only on its own files, route trusting only a matching cache,
and the one atomic switch of an output (issue: nothing lost, nothing mixed, nothing leaked).

Concurrency is tested with real processes; the kill inside the switch with a real SIGKILL at each rename
of the switch (the driver of tests/test_crash_safety.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from curate.cli import main
from curate.io.atomic import clean_stale_temps, file_sha256, write_json
from tests.test_crash_safety import killed_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "gsm8k_prompt_completion.jsonl"


def prism_args(inp: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["prism", "--input", str(inp), "--out", str(out), "--model", model, "--max-length", "64",
            "--batch-tokens", "512", "--shard-size", "4", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "gsm8k.jsonl"
    path.write_text("\n".join(DEMO.read_text().splitlines()[:12]) + "\n")
    return path


@pytest.fixture(scope="module")
def finished(corpus, tiny_model_dir, tmp_path_factory) -> Path:
    """A finished prism output (its cache in OUT/.work), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("done") / "out"
    assert main(prism_args(corpus, out, tiny_model_dir)) == 0
    return out


@pytest.fixture
def routed(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    state = out / ".work" / "state.json"  # its shard paths name the copied-from folder: point them here
    state.write_text(state.read_text().replace(str(finished), str(out)))
    return out


def read_partitions(out: Path) -> dict[str, list[str]]:
    ids = {}
    for part in ("sft", "rl"):
        ids[part] = [i for p in sorted((out / part).glob("*.arrow"))
                     for i in pa.ipc.open_stream(pa.OSFile(str(p))).read_all().column("id").to_pylist()]
    return ids


def assert_consistent(out: Path) -> None:
    """What a reader must always see: one run's partitions with that run's manifest."""
    m = json.loads((out / "manifest.json").read_text())
    listed = sorted(f for part in ("sft", "rl") for f in m["files"][part])
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("[sr][fl]*/*.arrow")) == listed
    assert all(file_sha256(out / f) == m["sha256"][f] for f in listed)
    ids = read_partitions(out)
    assert not set(ids["sft"]) & set(ids["rl"])
    assert (len(ids["sft"]), len(ids["rl"])) == (m["counts"]["sft"], m["counts"]["rl"])


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kw)


HOLD = """import sys, time
from pathlib import Path
from curate.io import folders
out = Path(sys.argv[1])
with folders.locked(folders.output_lock_path(out), out, "--out"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(routed):
    """A real process holding OUT's lock (as a running job does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(routed)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


# 1. two runs on one output folder
def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_holder(routed, holder):
    before = {p: p.read_bytes() for p in routed.rglob("*") if p.is_file() and ".work" not in p.parts}
    t = time.monotonic()
    r = cli("route", "--work", str(routed / ".work"), "--out", str(routed), "--metric", "cv")
    assert r.returncode == 2 and time.monotonic() - t < 60
    assert "in use by another curate run" in r.stderr and f"pid {holder.pid}" in r.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_two_routes_started_together_leave_one_consistent_output(routed):
    procs = [subprocess.Popen([sys.executable, "-m", "curate.cli", "route", "--work", str(routed / ".work"),
                               "--out", str(routed), "--metric", metric], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for metric in ("cv", "kurtosis")]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, errors
    assert all("in use by another curate run" in e for c, e in zip(codes, errors) if c == 2)
    assert_consistent(routed)


# 2. two prism jobs sharing a work folder
def test_a_prism_job_on_a_locked_work_folder_fails(corpus, tiny_model_dir, tmp_path, routed):
    work = routed / ".work"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.replace("folders.output_lock_path(out)", "out / '.curate.lock'"),
                             str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        code = main(prism_args(corpus, tmp_path / "other", tiny_model_dir, "--work", str(work)))
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and not (tmp_path / "other" / "manifest.json").exists()


# 3. route after a later run on other input was killed mid-probe
def test_route_refuses_a_cache_changed_by_a_later_killed_run(routed, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(DEMO.read_text().splitlines()[20:32]) + "\n")
    args = prism_args(other, tmp_path / "o2", tiny_model_dir, "--work", str(routed / ".work"))
    state = (routed / ".work" / "state.json").read_bytes()
    assert killed_run(args, "*/probe/part-*.done.json", 1, "after") == -signal.SIGKILL
    assert main(["route", "--work", str(routed / ".work"), "--out", str(tmp_path / "r")]) == 2
    assert "no finished prism run" in capsys.readouterr().err  # the later run withdrew the state first
    (routed / ".work" / "state.json").write_bytes(state)  # and had it not (an older curate, a copied state):
    assert main(["route", "--work", str(routed / ".work"), "--out", str(tmp_path / "r")]) == 2
    assert "ingest shards were rewritten" in capsys.readouterr().err
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_route_refuses_a_shard_changed_since_the_state(routed, capsys):
    probe = sorted((routed / ".work" / "probe").glob("part-*.arrow"))[1]
    probe.write_bytes(probe.read_bytes()[:-8] + b"\0" * 8)
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed)]) == 2
    assert str(probe) in capsys.readouterr().err


def test_route_refuses_changed_inputs(routed, corpus, tmp_path, capsys):
    state = json.loads((routed / ".work" / "state.json").read_text())
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(DEMO.read_text().splitlines()[:11]) + "\n")
    state["config"]["input"] = [str(changed)]
    write_json(routed / ".work" / "state.json", state)
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed)]) == 2
    assert "changed since the prism run" in capsys.readouterr().err


# 4. a kill inside the switch never shows a reader two runs; the next run finishes the job
@pytest.mark.parametrize("pattern", ["*/.out.staging/manifest.json", "*/.out.staging/.work", "*/.out.old", "*/out"])
def test_kill_at_each_step_of_the_switch(routed, pattern):
    args = ["route", "--work", str(routed / ".work"), "--out", str(routed), "--metric", "cv"]
    assert killed_run(args, pattern, 1, "after") == -signal.SIGKILL
    if routed.exists():
        assert_consistent(routed)
    else:  # killed between the two renames: the complete new output waits beside it
        assert (routed.parent / ".out.staging" / "manifest.json").is_file()
    assert main(args) == 0
    assert_consistent(routed)
    assert json.loads((routed / "manifest.json").read_text())["routing"]["metric"] == "cv"
    assert (routed / ".work" / "state.json").is_file()
    assert sorted(p.name for p in routed.parent.glob(".out.*")) == [".out.curate.lock"]


# 5-7. curate replaces only what it wrote
def test_out_equal_to_or_holding_the_input_is_refused(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sft").mkdir(parents=True)
    (data / "sft" / "mine.jsonl").write_text(DEMO.read_text().splitlines()[0] + "\n")
    (data / "rl").mkdir()
    for out in (data, tmp_path):
        assert main(prism_args(data, out, tiny_model_dir)) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert (data / "sft" / "mine.jsonl").exists() and (data / "rl").is_dir()


def test_an_output_folder_that_is_not_curates_is_refused(corpus, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sft").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(prism_args(corpus, out, tiny_model_dir)) == 2
    assert "not a curate output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sft"]


def test_a_work_folder_that_is_not_curates_is_refused(corpus, tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "thesis.tex").write_text("mine")
    assert main(prism_args(corpus, tmp_path / "o", tiny_model_dir, "--work", str(work))) == 2
    assert "not a curate cache" in capsys.readouterr().err


def test_a_users_own_files_in_an_output_survive_a_rerun(routed):
    (routed / "notes.tmp").write_text("mine")
    (routed / ".work" / "mine.tmp").write_text("mine too")
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed), "--metric", "cv"]) == 0
    assert (routed / "notes.tmp").read_text() == "mine" and (routed / ".work" / "mine.tmp").exists()


def test_clean_stale_temps_removes_only_curates_own(tmp_path):
    for name in (".manifest.json.4242.tmp", "notes.tmp", ".notes.tmp", "x.12.tmp"):
        (tmp_path / name).write_text("")
    assert clean_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "notes.tmp", "x.12.tmp"]


def test_out_inside_the_input_is_not_reingested(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(DEMO.read_text().splitlines()[:6]) + "\n")
    for _ in range(3):
        assert main(prism_args(data, data / "routed", tiny_model_dir)) == 0
    m = json.loads((data / "routed" / "manifest.json").read_text())
    assert m["counts"]["input"] == 6 and m["counts"]["sft"] + m["counts"]["rl"] == 6


# 8. paths in state.json cannot leave the work folder
def test_state_signal_paths_outside_the_work_folder_are_refused(routed, capsys):
    state = json.loads((routed / ".work" / "state.json").read_text())
    state["signals"] = {"prefix": [{"path": "/etc/passwd", "key": "k", "sha256": "s"}]}
    write_json(routed / ".work" / "state.json", state)
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed)]) == 2
    assert "outside" in capsys.readouterr().err


# options, interrupts, file-level failures
@pytest.mark.parametrize("flag", [("--threshold", "nan"), ("--max-length", "0"), ("--max-length", "-1"),
                                  ("--limit", "0"), ("--limit", "-1"), ("--batch-tokens", "-4"), ("--workers", "0"),
                                  ("--parse-procs", "-1"), ("--shard-size", "0"), ("--quantile", "1.5")])
def test_options_out_of_range_are_refused_before_any_work(corpus, tmp_path, capsys, flag):
    out = tmp_path / "o"
    assert main(["prism", "--input", str(corpus), "--out", str(out), *flag]) == 2
    assert flag[0] in capsys.readouterr().err and not out.exists()


def test_route_refuses_a_nan_threshold(routed, capsys):
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed), "--threshold", "nan"]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_nothing_routed_exits_2_with_the_counts(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "cut\n{"messages": 3}\n')
    out = tmp_path / "o"
    assert main(prism_args(bad, out, tiny_model_dir)) == 2
    err = capsys.readouterr().err
    assert "nothing routed: 0 of 2 records (quarantined 2" in err
    assert len((out / "quarantine" / "part-00000.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_exits_130_with_one_line(corpus, tiny_model_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", *prism_args(corpus, tmp_path / "o", tiny_model_dir)],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # interrupted at the probe stage (an interrupt sent as ingest began was once seen not to stop a run
    # under load, cause not found yet: see the project notes)
    while not (tmp_path / "o" / ".work" / "probe").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_a_full_disk_names_the_file(corpus, tiny_model_dir, tmp_path):
    def limit():  # every write past 4 KiB fails as a full disk does (EFBIG instead of ENOSPC)
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 10, 4 << 10))

    r = cli(*prism_args(corpus, tmp_path / "o", tiny_model_dir), preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(tmp_path / "o") in r.stderr and "cannot write" in r.stderr


def test_a_corrupt_weights_file_is_named(corpus, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(prism_args(corpus, tmp_path / "o", str(model))) == 2
    assert f"{model}: cannot load the model" in capsys.readouterr().err


# exports read exactly the shards the routed manifest lists, as it lists them
def test_export_refuses_a_routed_folder_changed_after_its_manifest(routed, tmp_path, capsys):
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(tmp_path / "trl")]) == 0
    shard = sorted((routed / "rl").glob("*.arrow"))[0]
    shutil.copy(shard, routed / "rl" / "part-09999.arrow")  # a file the manifest does not list
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(tmp_path / "trl")]) == 2
    assert "part-09999.arrow" in capsys.readouterr().err
    (routed / "rl" / "part-09999.arrow").unlink()
    other = sorted((routed / "sft").glob("*.arrow"))[0]
    shutil.copy(other, shard)  # same name, other rows
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(tmp_path / "trl")]) == 2
    assert f"{shard}: its sha256" in capsys.readouterr().err
    assert json.loads((tmp_path / "trl" / "manifest.json").read_text())["export"]["target"] == "trl"


def test_export_and_jobs_do_not_take_each_others_folders(routed, corpus, tiny_model_dir, tmp_path, capsys):
    assert main(["export", "--routed", str(routed), "--to", "verl", "--out", str(tmp_path / "v")]) == 0
    assert main(prism_args(corpus, tmp_path / "v", tiny_model_dir)) == 2  # an export is not a job output
    assert "not a curate output" in capsys.readouterr().err
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(routed)]) == 2
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(corpus.parent / "e")]) == 0
    assert main(["export", "--routed", str(tmp_path / "v"), "--to", "trl", "--out", str(corpus.parent / "e")]) == 2


# faults a second round of attacks found
@pytest.mark.parametrize("setting", ["threshold=nan", "threshold=inf", "max_length=abc", "shard_size=abc"])
def test_pipeline_file_values_are_type_and_range_checked(corpus, tmp_path, capsys, setting):
    code = main(["run", str(REPO / "pipelines" / "prism.yaml"), "--set", f"input=[{corpus}]",
                 "--set", f"out={tmp_path / 'o'}", "--set", setting])
    assert code == 2 and setting.split("=")[0].replace("_", "-") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_kill_while_the_first_staging_manifest_is_written_resumes(corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = prism_args(corpus, out, tiny_model_dir)
    assert killed_run(args, "*/.out.staging/manifest.json", 1, "before") == -signal.SIGKILL
    assert main(args) == 0
    assert_consistent(out)
    assert not list(out.glob("*.tmp")) and sorted(p.name for p in tmp_path.glob(".out.*")) == [".out.curate.lock"]


def test_folders_beside_the_output_that_are_not_curates_are_never_touched(routed, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "userdir").mkdir(parents=True)
    (mine / "userdir" / "data.txt").write_text("precious")
    for name in (".userdir.old", ".userdir.staging", ".results.old"):
        (mine / name).mkdir()
        (mine / name / "keep.txt").write_text(name)
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
    for out in ("userdir", "results"):
        assert main(["route", "--work", str(routed / ".work"), "--out", str(mine / out)]) == 2
        assert "curate" in capsys.readouterr().err
    after = sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if "curate.lock" not in p.name)
    assert after == before


@pytest.mark.parametrize("failure", ["infinite loss", "NaN gradient"])
def test_a_non_finite_probe_result_quarantines_its_row(routed, failure):
    work = routed / ".work"
    state = json.loads((work / "state.json").read_text())
    shard = Path(state["probe"][0]["path"])
    t = pa.ipc.open_stream(pa.OSFile(str(shard))).read_all()
    cols = t.to_pydict()
    if failure == "infinite loss":  # as a model that overflows on this one example gives
        cols["probe_loss"][0] = float("inf")
    else:  # the probe stage's row for a NaN gradient: no norms, NaN loss and total, null metrics
        cols["probe_loss"][0] = cols["grad_norm_total"][0] = float("nan")
        for name in ("grad_norms", "gini", "cv", "kurtosis", "magnitude"):
            cols[name][0] = None
    from curate.io.atomic import write_arrow
    sha = write_arrow(shard, pa.table(cols, schema=t.schema))
    marker = shard.with_suffix(".done.json")
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "sha256": sha}))
    state["probe"][0]["sha256"] = sha
    write_json(work / "state.json", state)
    assert main(["route", "--work", str(work), "--out", str(routed)]) == 0
    m = json.loads((routed / "manifest.json").read_text())
    assert m["counts"]["quarantined_probe"] == 1 and m["counts"]["sft"] + m["counts"]["rl"] == 11
    rows = [json.loads(x) for x in (routed / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["probe"] and "not finite" in rows[0]["reason"]
    assert_consistent(routed)


def test_a_copied_output_never_reads_the_originals_cache(finished, corpus, tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    assert main(["route", "--work", str(copy / ".work"), "--out", str(tmp_path / "r")]) == 2
    assert "moved or copied" in capsys.readouterr().err
    assert main(prism_args(corpus, copy, tiny_model_dir)) == 0
    state = (copy / ".work" / "state.json").read_text()
    assert str(finished) not in state
    assert json.loads((copy / "manifest.json").read_text())["cache"]["probe"]["computed"] == 3


@pytest.mark.parametrize("tamper", [lambda s: [], lambda s: {**s, "probe": "x"}, lambda s: {k: v for k, v in s.items() if k != "probe"},
                                    lambda s: {**s, "probe": [{**s["probe"][0], "path": 5}, *s["probe"][1:]]},
                                    lambda s: {**s, "modules": s["modules"][:3]}])
def test_a_malformed_state_is_an_error_naming_it(routed, capsys, tamper):
    path = routed / ".work" / "state.json"
    write_json(path, tamper(json.loads(path.read_text())))
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed)]) == 2
    assert "rerun `curate prism`" in capsys.readouterr().err


def test_a_changed_ingest_quarantine_is_refused(routed, capsys):
    with open(routed / ".work" / "ingest" / "quarantine.jsonl", "a") as fh:
        fh.write('{"source": "x"}\n')
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed)]) == 2
    assert "quarantine.jsonl: missing or changed" in capsys.readouterr().err


def test_an_output_name_that_is_not_utf8_is_refused_up_front(corpus, tiny_model_dir, tmp_path, capsys):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/o\xff"))
    assert main(prism_args(corpus, out, tiny_model_dir)) == 2
    assert "not valid UTF-8" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_export_lists_an_empty_routed_partition(routed, tmp_path):
    assert main(["route", "--work", str(routed / ".work"), "--out", str(routed), "--quantile", "1"]) == 0
    assert main(["export", "--routed", str(routed), "--to", "trl", "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert "no rows" in m["skipped"]["rl"] and not (tmp_path / "e" / "rl.jsonl").exists()


def test_route_during_a_prism_run_on_its_work_names_the_holder(routed, capsys):
    work = routed / ".work"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.replace("folders.output_lock_path(out)", "out / '.curate.lock'"),
                             str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert main(["route", "--work", str(work), "--out", str(routed.parent / "r2")]) == 2
    finally:
        proc.kill()
        proc.wait()
    assert "in use by another curate run" in capsys.readouterr().err


def test_a_signal_column_the_routed_schema_lacks_is_an_error_not_dropped(finished):
    from curate.io.atomic import read_arrow
    from curate.corpus.route import RouteConfig, routed_rows, simple_decision

    work = finished / ".work"
    records, tokens, probe = (read_arrow(next((work / stage).glob("part-*.arrow")))
                              for stage in ("ingest", "tokenize", "probe"))
    n = tokens.num_rows
    records = records.slice(0, n)
    decision = simple_decision(records, probe, 0.5, RouteConfig())
    ok = routed_rows(records, tokens, probe, decision, pa.table({"rm_score": pa.nulls(n, pa.float32())}))
    assert ok.num_rows == n - probe.column("grad_norms").null_count
    with pytest.raises(ValueError, match="toxicity are not declared in schemas/routed.schema.json"):
        routed_rows(records, tokens, probe, decision, pa.table({"toxicity": pa.nulls(n, pa.float32())}))
