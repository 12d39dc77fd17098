"""The jobs, side by side (see jobs.base.Job). `CONFIGS`: name -> options class, enough to build the command
line (quick: no torch); `JOBS`: name -> Job class, each imported on first use. The command line offers one
subcommand per job; `curate run FILE` picks one by the file's `job:` key."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from curate.config import DriftConfig, IrftConfig, PrismConfig

CONFIGS = {"prism": PrismConfig, "drift": DriftConfig, "irft": IrftConfig}
_CLASSES = {"prism": ("curate.jobs.prism", "PrismJob"), "drift": ("curate.jobs.drift", "DriftJob"),
            "irft": ("curate.jobs.irft", "IrftJob")}


class _Jobs(Mapping):
    """name -> Job class, the job's module imported when first asked for."""

    def __getitem__(self, name: str):
        module, cls = _CLASSES[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self):
        return iter(_CLASSES)

    def __len__(self) -> int:
        return len(_CLASSES)


JOBS = _Jobs()


def run(name: str, cfg) -> dict:
    """Run job `name` with its config (a CONFIGS[name] instance); the manifest it wrote."""
    return JOBS[name](cfg).run()
