"""Evaluation: metrics of explanations (localisation, perturbation, sanity checks), method
comparison and figures."""
