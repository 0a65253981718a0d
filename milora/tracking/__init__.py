"""MLflow, a module per concern (callers import the module they need; nothing is re-exported here):

* `store`: where runs live (a tracking server or the embedded SQLite store), the client, MLflow's HTTP retries;
* `scrub`: credentials kept out of everything logged;
* `identity`: which MLflow run a pipeline run is, and the content keys of its outputs and of its model;
* `lineage`: the lineage tags (git commit, DVC data hashes, base identity, SVD cache keys, suites);
* `runlog`: what a pipeline run logs to its MLflow run (params, metrics, tags, artifacts);
* `packaging`: the registered model, an offline-loadable pyfunc;
* `lookups`: registry queries (aliases, versions by run or content key, a version's metrics);
* `gate`: the champion/challenger decision, applied to a version and recorded;
* `gate_lock`: the gate's mutex, a registered model in the tracking store itself;
* `registration`: the `register` step and `milora promote`, orchestrating the above;
* `models`: a model to evaluate outside the pipeline (`milora eval --model`).
"""
