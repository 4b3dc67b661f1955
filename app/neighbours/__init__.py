"""The k-nearest-neighbour graph of the collection and what is built on it (issue #9, items 5 and 6).

- :mod:`app.neighbours.store`: the SQLite file under ``DATA_DIR`` holding graphs, DBA vectors and job state;
- :mod:`app.neighbours.graph`: the job's work (ANN search of every stored vector, then DBA vectors);
- :mod:`app.neighbours.jobs`: the background job runner the service owns (one job at a time, resumable);
- :mod:`app.neighbours.duplicates`: near-duplicate groups, connected components over a score threshold;
- :mod:`app.neighbours.dba`: database-side augmentation, the DBA vectors the job computes (searches re-rank by them
  in :mod:`app.search.dba`, through :meth:`app.neighbours.jobs.NeighbourJobs.dba_rerank`).
"""
