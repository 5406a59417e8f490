"""Benchmarks: every performance claim is a workload run here, beside its roofline and a peer.

`nano-vllm bench throughput|latency|serve|cpu` (cli.py) measures the machine
(roofline.py), builds the workload of docs/benchmarks.md (workloads.py), runs the
peers (peers.py) and nano-vllm (throughput.py, latency.py) or a serving client
(serve.py), and prints one table (report.py).
"""
