"""HiveMiner: a decentralized GPT-2 training swarm on hivemind."""

__version__ = "0.1.0"
