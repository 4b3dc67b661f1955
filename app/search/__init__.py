"""Search features over the :class:`app.vectordb.base.VectorDBHandler` contract, the same on every backend.

``paging.py`` (offset, score threshold, leaving query images out, one search page), ``expansion.py`` (average query
expansion, αQE), ``dba.py`` (re-ranking the candidates by their DBA vectors) and ``query.py`` (combined and negative
queries) need nothing from a backend beyond ``search`` and ``get``. ``searcher.py``
(:class:`app.search.searcher.Searcher`) puts them behind one object per kind of query, which
:class:`app.service.SearchService` calls. The neighbour graph (:mod:`app.neighbours`) builds on them, never the other
way round: ``dba.py`` reads the DBA vectors through a lookup the graph's owner hands in.
"""
