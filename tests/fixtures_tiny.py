"""Session fixtures for the tiny area."""
