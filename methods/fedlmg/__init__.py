from .server_fedlmg import FedLmg

__all__ = ["FedLmg"]
