"""Chat with the course model from any OpenAI or Ollama client: `python -m helpers.serve --help`."""
