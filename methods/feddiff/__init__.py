from .server_feddiff import FedDiff

__all__ = ["FedDiff"]
