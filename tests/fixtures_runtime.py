"""Session fixtures for the runtime area."""
