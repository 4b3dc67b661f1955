"""The command-line tools, installed as ``image-search-index``, ``image-search-find``, ``image-search-fsck`` and
``image-search-migrate`` (``[project.scripts]``); ``scripts/*.py`` run the same ``main`` functions from a checkout."""
