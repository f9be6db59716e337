"""Custom Flower strategies (Message API). One strategy per module; see ``registry``."""
