from aevae.cli import run

run()
