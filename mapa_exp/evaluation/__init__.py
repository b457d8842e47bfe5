"""Evaluation: estimators of log p(x) for trained generative models (method.md §7)."""
