"""What the ``nightjar`` command does for people at their own terminal: download and upload
archives in the Mendix format, create and list Backups, start and follow Restores.

It runs with the person's kubeconfig: it reads Backups and BackupStorages from the API server
and, for downloads and uploads, talks to the bucket directly with the credentials in the
BackupStorage's Secret (so it needs what reading that Secret needs, nothing more). Everything
streams between the bucket and the file: nothing is staged on local disk.
"""

from __future__ import annotations


class CommandError(Exception):
    """Something the person asked for cannot be done; the message says what and why (never a
    secret). The CLI prints it and exits 1."""
