"""The numerical core, usable without the pipeline: the adapter (`AdapterConfig`, init, save/load, merge, export), the SVD engine, the SVD cache, S3 access, atomic file I/O and the error kinds."""
