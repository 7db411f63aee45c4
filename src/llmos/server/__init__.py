"""The HTTP face of llmos: an OpenAI-compatible API over the engine."""

from llmos.server.app import create_app

__all__ = ["create_app"]
