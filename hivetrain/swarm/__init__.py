"""The local swarm launcher: ``python -m hivetrain.swarm``."""
