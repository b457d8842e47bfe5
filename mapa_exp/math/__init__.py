"""Mathematics as pure torch functions: likelihoods, bounds, proposals (no Lightning, Hydra or I/O)."""
