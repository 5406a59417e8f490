"""The visualizer: watch the engine work, a step at a time.

    attention.py   softmax(q K^T) of one sequence, recomputed for display beside the forward pass
    recorder.py    the step observer: what every request and the KV pool did at each step
    panels.py      state -> text: attention heat map, KV-cache memory map, scheduler, timeline
    live.py        the panels redrawn in place in a terminal (rich)
    plain.py       the same panels as ASCII frames every N steps (logs, pipes)
    report.py      a self-contained HTML page of the run, with matplotlib pictures
    demo.py        the `--demo` scenario: staggered arrivals, a long prompt prefilled in chunks
    run_command.py `nano-vllm run`

None of it is imported, nor any hook or observer registered, when the
visualizer is off: the engine's fast path does not know it exists.
"""
