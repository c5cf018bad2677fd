"""The OpenAI-compatible HTTP server, the chat REPL and their command-line verbs."""
