"""Evaluation: SLF / ALF / AFF protocols, test-time attacks, corruptions, reports (advfast-eval).

``load_classifier(out_dir)`` reloads the exact classifier an advfast-eval run scored."""

from advfast.eval.saved_classifier import load_classifier

__all__ = ["load_classifier"]
