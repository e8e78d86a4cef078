from .server_zero_shot import ZeroShot

__all__ = ["ZeroShot"]
