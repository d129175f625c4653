"""Deployment helpers: TLS and SuperNode credentials, SuperLink/SuperNode processes."""
