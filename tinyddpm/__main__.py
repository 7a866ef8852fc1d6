"""``python -m tinyddpm``: the same command line as ``tinyddpm``."""

from tinyddpm.cli import main

main(prog_name="tinyddpm")
