"""Pipeline basics: the typed config (`params.yaml`), paths, the workspace lock and structured step results."""
