"""curate: per-example training signals and routed SFT/RL datasets.

The Python API (curate.api) is imported on first use, so `import curate` stays cheap:
`curate.prism`, `curate.drift`, `curate.irft`, `curate.route`, `curate.export`, `curate.score`,
`curate.load`."""

__version__ = "0.1.0"

API = ("prism", "drift", "irft", "route", "export", "score", "load", "Result")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from curate import api

        return getattr(api, name)
    raise AttributeError(f"module 'curate' has no attribute {name!r}")
