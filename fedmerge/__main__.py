"""``python -m fedmerge`` runs the command line."""

from fedmerge.cli import main

main()
