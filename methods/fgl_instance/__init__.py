from .server_fgl_instance import FglInstance

__all__ = ["FglInstance"]
