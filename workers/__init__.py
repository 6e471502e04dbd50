"""Code that computes on a Ray worker: models, data, adapter methods, training, evaluation,
inference and the adapter artifact store. Imports neither Ray Tune nor Ray Serve."""
