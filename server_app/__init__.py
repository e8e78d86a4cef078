"""ServerApp of the one-shot round."""
