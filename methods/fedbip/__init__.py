from .server_fedbip import FedBiP

__all__ = ["FedBiP"]
