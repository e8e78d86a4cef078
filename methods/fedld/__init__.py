from .server_fedld import FedLD

__all__ = ["FedLD"]
