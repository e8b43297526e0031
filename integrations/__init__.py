"""Framework adapters, installed as ``slim_plugins.integrations`` (a PyPI package named ``integrations`` exists).

Each adapter only registers its framework's module types and models and glues the framework's training loop to
the core verbs (DESIGN rule 8). Importing an adapter needs that framework installed.
"""
