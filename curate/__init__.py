"""curate: per-example training signals and routed SFT/RL datasets."""

__version__ = "0.1.0"
