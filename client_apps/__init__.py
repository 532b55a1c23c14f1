"""ClientApps of hetfed; a scenario names one in its pyproject.toml."""
