"""`python -m helpers.serve`: the chat server (helpers.serve.server)."""

from helpers.serve.server import main

main()
