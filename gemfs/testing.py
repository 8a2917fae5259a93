"""pytest plugin: fixtures for mounting gemfs in tests (filled in by the mount issue)."""
