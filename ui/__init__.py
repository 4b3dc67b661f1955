"""The web UI served at ``/ui/``: a static single-page app in ``static/`` (HTML, CSS, JavaScript modules, no build
step) that calls the service's REST API; ``app/api/site.py`` serves it."""
