"""mapa-exp: MAPA, VAE and IWAE on ground-truth data, with exact evaluation and cluster-scale sweeps."""

__version__ = "0.1.0"
