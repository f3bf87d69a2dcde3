"""Session fixtures for the export area."""
