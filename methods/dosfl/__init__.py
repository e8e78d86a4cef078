from .server_dosfl import Dosfl

__all__ = ["Dosfl"]
