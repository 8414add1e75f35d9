"""The cost-of-a-gradient study of issue 8: ``python -m bench.complexity.complexity``."""
