from .server_oscar import Oscar

__all__ = ["Oscar"]
