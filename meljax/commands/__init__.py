"""One module per ``meljax`` command; see ``meljax.cli``."""
