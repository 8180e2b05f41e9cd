"""Reconcilers: one per kind, API calls allowed, no kopf (handlers.py adapts them)."""
