"""`python -m client` is the `conveyor` command."""

from client.cli import main

main()
