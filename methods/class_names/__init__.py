from .server_class_names import ClassNames

__all__ = ["ClassNames"]
