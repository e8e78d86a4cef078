from .server_public_only import PublicOnly

__all__ = ["PublicOnly"]
