"""Gradio UI mounted at ``/ui`` of the API server."""
