"""MLflow: run logging with lineage, model registration and the champion/challenger gate."""
