"""Models: the registry of offline models, loading and conversion, and architecture adapters."""
