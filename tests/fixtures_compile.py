"""Session fixtures for the compile area."""
