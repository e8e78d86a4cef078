from .server_guha import Guha

__all__ = ["Guha"]
