"""Federated learning: client updates and server aggregations as plain functions, run in process or on Flower."""
