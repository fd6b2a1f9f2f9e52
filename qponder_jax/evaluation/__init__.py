"""Pieces of the eval job (qponder_jax/eval.py): scoring (decode / level), description checks, reports and plots."""
