"""Fixtures for tests that need a task store (owned by the store work)."""
