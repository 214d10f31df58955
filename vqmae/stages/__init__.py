"""The pipeline stages: each one reads artifacts of the floors below and writes its own."""
