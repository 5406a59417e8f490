"""The OpenAI-compatible HTTP server (`nano-vllm serve`): app.py has the routes, protocol.py the
request and response shapes, metrics.py the Prometheus metrics and log line, cli.py the command."""
