from .server_feddisc import FedDisc

__all__ = ["FedDisc"]
