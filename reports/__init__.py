"""Reports over built engines: parity (engine vs reference, pruned vs unpruned), latency next to the FLOPs
ratio, and accuracy on tiny-vqa. They run engines through `runtime` and write typed report artifacts.

    from reports.parity import parity_report
"""
