"""What a network is: its activations and losses (one table each), dropout, the
flat parameter buffer, workspaces, the passes (network.py) and MLP (mlp.py)."""
