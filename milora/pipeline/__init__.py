"""Pipeline basics: the typed config (`params.yaml`), paths, the workspace lock, structured step results and the
pipeline as DVC records it (`dvcstate`)."""
