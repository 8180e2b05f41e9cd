"""Pure domain logic: no kopf, no Kubernetes or S3 clients, no clock of its own."""
