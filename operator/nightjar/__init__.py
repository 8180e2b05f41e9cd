"""Nightjar: backups of PostgreSQL databases and file documents to S3, as a Kubernetes operator."""

__version__ = "0.1.0"
