"""The HTTP routes, one module per protocol; server/app.py wires them into one app."""
