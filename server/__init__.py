"""kvserve's command line and (with the HTTP-server issue) its OpenAI-compatible front end."""
