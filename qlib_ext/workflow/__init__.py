"""Workflows: load qrun YAML + ``grid:``, validate it, expand it into plain Qlib task dicts (sweeps, search spaces)."""
