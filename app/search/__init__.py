"""Search features over the :class:`app.vectordb.base.VectorDBHandler` contract, the same on every backend.

``paging.py`` (offset, score threshold, leaving query images out, one search page), ``expansion.py`` (average query
expansion, αQE) and ``query.py`` (combined and negative queries) need nothing from a backend beyond ``search`` and
``get``. ``searcher.py`` (:class:`app.search.searcher.Searcher`) puts them behind one object per kind of query,
which :class:`app.service.SearchService` calls.
"""
