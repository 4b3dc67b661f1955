"""The Gradio web UI mounted at ``/ui/``: ``app.py`` (composes the Blocks from the tabs and wires the page's load
event), one module per tab or panel (``search_tab.py`` with ``large_view.py``, ``add_tab.py``, ``duplicates_tab.py``,
``libraries_tab.py`` with the wording in ``library_text.py``, ``about_tab.py``), ``search.py`` (the search handlers,
calling ``SearchService`` in process), ``context.py`` (what the tabs share), ``assets.py`` (CSS, JavaScript, theme),
``query.py`` (what a search is, its filters and links), ``files.py`` (files handed to Gradio) and ``mount.py``
(``gr.mount_gradio_app``, built while the service opens)."""
