"""Evaluation: estimators of log p(x) for trained generative models (spec §7)."""
