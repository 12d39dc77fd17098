"""The command line as a new user meets it: help without a command, a version, quick help that shows
defaults, log levels and a log file."""

from __future__ import annotations

import json
import subprocess
import sys

from curate import __version__
from curate.cli import main
from tests.conftest import REPO


def test_bare_curate_prints_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: curate" in out and "prism" in out and "--verbose" in out
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"curate {__version__}"


def test_help_imports_no_torch_and_shows_defaults():
    code = ("import sys, curate.cli as c; p = c.build_parser(); "
            "text = p._subparsers._group_actions[0].choices['prism'].format_help(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules); print(text)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False False"
    assert "(default: 2048)" in out and "(default: gini)" in out and "(default: 200)" in out


def test_verbose_log_file_and_quiet(raw_dir, tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)   # -q sets it: restored after the test
    args = ["prism", "--input", str(raw_dir), "--out", str(tmp_path / "out"), "--model", tiny_model_dir,
            "--max-length", "256", "--shard-size", "4"]
    assert main([*args, "-v", "--log-file", str(tmp_path / "run.log")]) == 0
    err = capsys.readouterr().err
    assert "curate: INFO: probe: 3 shards computed, 0 from cache" in err
    log = (tmp_path / "run.log").read_text()
    assert "INFO curate.jobs.base: tokenize: 3 shards computed" in log
    assert main(["-q", *args]) == 0   # before the subcommand too; all cached now
    err = capsys.readouterr().err
    assert "INFO" not in err and "probe:" not in err   # no log lines, no progress bars


from tests.test_pipeline import raw_dir  # noqa: E402,F401  (fixture)


def test_dry_run_plans_without_probing_or_writing(raw_dir, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    args = ["prism", "--input", str(raw_dir), "--out", str(out), "--model", tiny_model_dir, "--max-length", "256",
            "--shard-size", "4", "--work", str(tmp_path / "work")]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 12 records (duplicates 1, quarantined at ingest 2) in 3 shards; 9 to probe" in text
    assert "estimated probe time" in text and not out.exists() and not (tmp_path / "work" / "probe").exists()
    assert main(args) == 0   # the real run reuses the dry run's ingest and tokenize shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"]["tokenize"] == {"computed": 0, "cached": 3}


def test_nothing_routed_with_module_scale_is_the_plain_error(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "truncated\n{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["prism", "--input", str(bad), "--out", str(tmp_path / "out"), "--model", tiny_model_dir,
                 "--module-scale", "numel"]) == 2
    assert "nothing routed: 0 of 2 records" in capsys.readouterr().err
    assert (tmp_path / "out" / "quarantine" / "part-00000.jsonl").exists()


def test_drift_and_irft_on_an_all_quarantined_input_fail_like_prism(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "truncated\n{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["drift", "--input", str(bad), "--out", str(tmp_path / "d"), "--verifier", "recorded"]) == 2
    assert "drift: nothing written: each of the 2 records was quarantined (2)" in capsys.readouterr().err
    assert main(["irft", "--input", str(bad), "--out", str(tmp_path / "i"), "--model", tiny_model_dir,
                 "--max-new-tokens", "4"]) == 2
    assert "irft: nothing written" in capsys.readouterr().err
    assert (tmp_path / "d" / "quarantine" / "part-00000.jsonl").exists()   # the reasons are written


def test_sampling_on_a_cluster_needs_an_explicit_device_and_engine(tmp_path, capsys):
    # device and engine are keyed into the samples' cache: "auto" resolved on the submitting machine could
    # name what the workers did not run; a recorded reward samples nothing and needs neither
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "1+1?", "completion": "2"}\n')
    for job in ("drift", "irft"):
        code = main([job, "--input", str(data), "--out", str(tmp_path / job), "--scheduler", "tcp://127.0.0.1:9"])
        assert code == 2 and "give --device (cpu or cuda) and --engine (hf or vllm)" in capsys.readouterr().err
    from curate.config import DriftConfig

    DriftConfig(input=[str(data)], scheduler="tcp://127.0.0.1:9", verifier="recorded")
    DriftConfig(input=[str(data)], scheduler="tcp://127.0.0.1:9", device="cuda", engine="hf")
