"""meljax."""
