"""`curate` command line. Thin: parse, build a config, call the pipeline, print where things are.

Exit codes: 0 success; 2 usage, input or file error (the message names the file and record; a folder in
use by another run; nothing written: every record quarantined or a duplicate); 130 interrupted (Ctrl-C; rerun to resume); 1 internal error."""

from __future__ import annotations

import argparse
import sys


class InputError(Exception):
    """Bad input or usage: exit code 2."""


# the options of `curate route`: every routing option of prism (the fields of RouteConfig)
ROUTE_OPTIONS = ("metric", "quantile", "threshold", "reverse", "seed", "stratify", "control", "module_scale", "bootstrap")


def cmd_job(args: argparse.Namespace) -> int:
    """prism, drift, irft: the subcommand's flags -> its job config -> the run's summary (prism
    --dry-run: the plan and estimated probe time instead)."""
    from curate import config
    from curate.jobs import CONFIGS

    cfg = config.from_args(args, CONFIGS[args.command])
    if getattr(args, "dry_run", False):
        from curate.jobs.dry_run import describe, dry_run

        print(describe(dry_run(cfg)))
        return 0
    print(run_job(args.command, cfg))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """`curate route`: re-route the finished prism run in --work into --out with the routing options given
    (the others keep RouteConfig's defaults); prints the summary."""
    from curate.corpus.route import RouteConfig
    from curate.jobs.prism import PrismJob
    from curate.jobs.reroute import reroute

    rcfg = RouteConfig(**{k: getattr(args, k) for k in ROUTE_OPTIONS if hasattr(args, k)})
    print(PrismJob.summary(reroute(args.work, args.out, rcfg), args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`curate report`: (re)write --routed's report.html, holding the folder's output lock (FolderInUse
    while a job holds it)."""
    from pathlib import Path

    from curate.io import folders
    from curate.report import write_report

    folder = Path(args.routed).resolve()
    with folders.locked(folders.output_lock_path(folder), folder, "--routed"):  # not while a job rewrites it
        print(f"wrote {write_report(args.routed)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`curate export`: write --routed as the files trainer --to reads, into --out; prints each file's row
    count and what was skipped or folded."""
    from curate.formats.export import export

    m = export(args.routed, args.to, args.out)
    files = ", ".join(f"{name} ({f['rows']} rows)" for name, f in m["files"].items())
    skipped = "".join(f"\n  skipped {p}: {why}" for p, why in m["skipped"].items())
    for kind, verb in (("rows_skipped", "skipped"), ("rows_folded", "folded")):
        skipped += "".join(f"\n  {verb} {n} {p} row(s): {why}"
                           for p, d in m[kind]["by_partition"].items() for why, n in d.items())
    print(f"exported {args.routed} for {args.to}: {files}\n  {args.out}/manifest.json{skipped}")
    return 0


def run_job(job: str, cfg) -> str:
    """Run a job's config; its one-paragraph summary."""
    from curate.jobs import JOBS

    return JOBS[job].summary(JOBS[job](cfg).run(), cfg.out)


def cmd_run(args: argparse.Namespace) -> int:
    """`curate run FILE`: the job the pipeline file's `job:` key names, its options from the file and
    `--set`; InputError for an unknown job."""
    from curate import config
    from curate.jobs import CONFIGS

    job = config.pipeline_job(args.pipeline)
    if job not in CONFIGS:
        raise InputError(f"{args.pipeline}: unknown job {job!r}; choose from {', '.join(CONFIGS)}")
    print(run_job(job, config.load_yaml(args.pipeline, args.set or [], CONFIGS[job])))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `curate` argument parser: one subcommand per job (its flags from the job's config class), and
    route, report, export and run."""
    from curate import config  # here, not at import: a Ctrl-C during its imports is then caught by main
    from curate.formats.export import TARGETS
    from curate.jobs import CONFIGS

    from curate import __version__

    parser = argparse.ArgumentParser(prog="curate", parents=[_log_options()], description=(
        "Per-example training signals for LLM post-training data, and routed SFT/RL datasets. "
        "`curate COMMAND --help` lists a command's options."))
    parser.add_argument("--version", action="version", version=f"curate {__version__}")
    sub = parser.add_subparsers(dest="command")
    common = [_log_options(argparse.SUPPRESS)]   # also after the subcommand: `curate prism ... -v`

    p = sub.add_parser("prism", parents=common, help="score every demonstration by gradient concentration and route it to sft/rl")
    config.add_arguments(p, CONFIGS["prism"])
    p.add_argument("--dry-run", action="store_true", help="ingest and tokenize, time the probe on one real batch, "
                   "print records, tokens, shards and the estimated probe time; probe nothing, write no output")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("route", parents=common, help="re-route a finished prism run from its cache (no gradients)")
    p.add_argument("--work", required=True, help="the prism run's work folder (default of prism: OUT/.work)")
    p.add_argument("--out", required=True, help="output folder for sft/, rl/, quarantine/, manifest.json")
    config.add_arguments(p, CONFIGS["prism"], only=ROUTE_OPTIONS)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("drift", parents=common, help="K verified multi-turn rollouts per prompt -> DRIFT-weighted SFT data")
    config.add_arguments(p, CONFIGS["drift"])
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("irft", parents=common, help="self-generated replies, implicit rewards and RM scores -> DPO pairs (IRFT/SPIN)")
    config.add_arguments(p, CONFIGS["irft"])
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("report", parents=common, help="(re)write DIR/report.html: plots of a routed or drift output folder")
    p.add_argument("--routed", required=True, help="output folder of prism, route or drift (holds manifest.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", parents=common, help="write a routed folder as the files one trainer reads")
    p.add_argument("--routed", required=True, help="a curate output folder (sft/, rl/, optional pairs/, manifest.json)")
    p.add_argument("--to", required=True, choices=tuple(TARGETS), help="target trainer")
    p.add_argument("--out", required=True, help="export folder (replaced as a whole; see docs/exports.md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", parents=common, help="run a pipeline file: pipelines/prism.yaml, drift.yaml or irft.yaml")
    p.add_argument("pipeline", help="YAML file whose keys are the job's options")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one option (repeatable)")
    p.set_defaults(func=cmd_run)
    return parser


def _log_options(default=None) -> argparse.ArgumentParser:
    """-v/--verbose, -q/--quiet, --log-file: given before or after the subcommand."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                         help="say what each stage does (-v), and per shard (-vv)")
    options.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                         help="only warnings and errors; no progress bars")
    options.add_argument("--log-file", default=default, help="also write the log, with timestamps, to this file")
    return options


def setup_logging(verbose: int = 0, quiet: bool = False, log_file: str | None = None) -> None:
    """The `curate` logger: warnings (quiet), info (-v) or debug (-vv) to stderr as "curate: LEVEL: ...",
    everything from info on (debug with -vv) to `log_file` with timestamps. Progress bars off when quiet."""
    import logging
    import os

    level = logging.WARNING if quiet or not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    log = logging.getLogger("curate")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    log.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("curate: %(levelname)s: %(message)s"))
    log.addHandler(console)
    if log_file:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(to_file)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"   # tqdm reads it for every bar's default


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return its exit code (module doc): 2 for an
    input, file, model or folder error, printed as "curate: error: ...", 130 on Ctrl-C. A usage error
    exits through argparse (SystemExit 2); any other exception propagates (exit code 1)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also during the imports of a job's libraries
        print("curate: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:   # bare `curate`: what it can do
        parser.print_help()
        return 0
    setup_logging(args.verbose, args.quiet, args.log_file)
    from curate.formats.adapters import BadRecord
    from curate.io.folders import FolderInUse
    from curate.io.readers import UnreadableFile
    from curate.models import ModelError

    try:
        return args.func(args)
    except (InputError, UnreadableFile, ModelError, BadRecord, FolderInUse, OSError, ValueError) as e:
        # OSError: a file-level failure (permission, a full disk), named by its message
        print(f"curate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
