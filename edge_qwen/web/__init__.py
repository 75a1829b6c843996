"""The chat page at `/`: its static assets (static/, vendored Markdown and highlighting libraries
in static/vendor/) and the router that serves them with a Content-Security-Policy (routes.py)."""

from .routes import CSP, router

__all__ = ["CSP", "router"]
