"""Benchmarks for trioai: a fast fake upstream and a WebSocket load generator."""
