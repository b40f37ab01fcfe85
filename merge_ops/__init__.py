"""mergeline's framework-free merge engine (no Dagster import anywhere in this package)."""
