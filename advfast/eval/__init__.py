"""Evaluation: SLF / ALF / AFF protocols, test-time attacks, corruptions, reports (advfast-eval)."""
