"""Fixtures for tests that need a Qlib-format dataset (owned by the data work)."""
