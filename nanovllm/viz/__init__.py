"""The visualizer: watch the engine work, a step at a time.

    attention.py   softmax(q K^T) of one sequence, recomputed for display beside the forward pass
    recorder.py    the step observer: what every request and the KV pool did at each step
    panels.py      state -> text: attention heat map, KV-cache memory map, scheduler, timeline
    live.py        the panels redrawn in place in a terminal (rich)
    plain.py       the same panels as ASCII frames every N steps (logs, pipes)
    report.py      a self-contained HTML page of the run, with matplotlib pictures
    demo.py        the `--demo` scenario: staggered arrivals, a long prompt prefilled in chunks
    workload.py    arrivals, the step loop, the summary line; the `Visualizer` that ties the above to an engine
    run_command.py `nano-vllm run`

With the visualizer off (and no report) no observer or hook is registered:
the engine's fast path does not know it exists.
"""
