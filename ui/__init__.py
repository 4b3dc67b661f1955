"""The Gradio web UI mounted at ``/ui/``: ``app.py`` (the Blocks and its handlers, calling ``SearchService`` in
process), ``query.py`` (what a search is, its filters and links), ``files.py`` (files handed to Gradio) and
``mount.py`` (``gr.mount_gradio_app``, built while the service opens)."""
