"""The command-line tools, installed as ``image-search-index``, ``image-search-find``, ``image-search-library`` and
the other ``image-search-*`` commands (``[project.scripts]``); ``scripts/*.py`` run the same ``main`` functions from
a checkout."""
