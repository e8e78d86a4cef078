from .server_feddeo import FedDeo

__all__ = ["FedDeo"]
