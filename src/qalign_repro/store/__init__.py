"""Durable storage of runs and everything that reads or checks it directly (SQL lives only here)."""
