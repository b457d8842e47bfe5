"""Lightning modules: thin shells that call the objectives in ``mapa_exp.math.bounds`` on a batch."""
