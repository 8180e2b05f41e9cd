"""Object storage: the key layout, manifests, and streaming S3 helpers."""
