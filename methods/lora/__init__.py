from .server_lora import Lora

__all__ = ["Lora"]
