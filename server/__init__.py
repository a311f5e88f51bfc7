"""kvserve's command line and its OpenAI-compatible HTTP front end."""
