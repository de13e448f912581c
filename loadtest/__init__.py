"""Locust load test of the Granite Speech ensembles (see README.md)."""
