"""The miner: trains the shared GPT-2 with hivemind.Optimizer and reports to Redis."""
