"""The jobs, side by side (see jobs.base.Job): name -> Job class. The command line offers one subcommand
per entry; `curate run FILE` picks one by the file's `job:` key."""

from __future__ import annotations

from curate.jobs.drift import DriftJob
from curate.jobs.irft import IrftJob
from curate.jobs.prism import PrismJob

JOBS = {job.name: job for job in (PrismJob, DriftJob, IrftJob)}


def run(name: str, cfg) -> dict:
    """Run job `name` with its config (a JOBS[name].config instance); the manifest it wrote."""
    return JOBS[name](cfg).run()
