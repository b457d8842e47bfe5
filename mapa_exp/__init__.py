"""mapa-exp: MAPA, VAE and IWAE on ground-truth data, with exact evaluation and cluster-scale sweeps."""

__version__ = "0.1.0"

from mapa_exp import resolvers as _resolvers  # noqa: E402,F401  registers ${mapa_k:...} etc. before any compose
from mapa_exp import config as _config  # noqa: E402,F401  registers the config schemas
