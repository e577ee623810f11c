"""Distributed plumbing around sae_core: Ray Data activations, Ray Train/Tune, MLflow, evaluation, CLI."""
