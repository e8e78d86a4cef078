from .server_local import Local

__all__ = ["Local"]
