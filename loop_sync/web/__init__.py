"""The onboarding web app: a person connects their Loop account in a browser."""

from loop_sync.web.app import create_app, serve_web

__all__ = ["create_app", "serve_web"]
