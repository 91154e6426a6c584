from meljax.cli import run

run()
