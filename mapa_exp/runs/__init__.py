"""One training job: a run, or a stack of runs trained as one model (``training``), its members and their
folders (``members``), checkpoints (``checkpoints``), callbacks (``callbacks``) and per-member metric
loggers (``loggers``). Sweeps of many jobs are in ``mapa_exp.sweeps``."""
