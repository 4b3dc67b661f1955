"""Images in memory: decode untrusted bytes (:mod:`app.imaging.decode`) and prepare them for a model and the store
(:mod:`app.imaging.prepare`). Pillow and numpy only: worker processes import this package without torch."""
