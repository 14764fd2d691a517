"""Benchmarks: load generators and measurements; jobs/ wires the servers they measure."""
