"""Model folders: config.json and safetensors headers, the one reader of their weights
(folder.py), and the memory plan of a run (plan.py)."""
