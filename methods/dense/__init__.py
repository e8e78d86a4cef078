from .server_dense import Dense

__all__ = ["Dense"]
