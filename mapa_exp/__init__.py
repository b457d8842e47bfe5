"""mapa-exp: MAPA, VAE and IWAE on ground-truth data, with exact evaluation and cluster-scale sweeps.

Importing the package loads nothing: ``mapa_exp.math`` is pure torch (no Hydra, no Lightning), and the configs'
resolvers and schemas register when ``mapa_exp.config`` is imported (the command lines, training and the
tests do). The layers and their import order are in README.md ("Layout").
"""

__version__ = "0.1.0"
