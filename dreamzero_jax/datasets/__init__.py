"""The data layer: built episode datasets -> clips -> batches (see pipeline.py for the contract)."""
