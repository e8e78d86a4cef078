from .server_fedavg import FedAvg

__all__ = ["FedAvg"]
