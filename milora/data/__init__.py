"""Data records: the supported source formats and the embedded synthetic data."""
