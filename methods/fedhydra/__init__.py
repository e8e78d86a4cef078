from .server_fedhydra import FedHydra

__all__ = ["FedHydra"]
