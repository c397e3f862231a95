"""The node agent (`titan-supervisor agent`, one per node; docs/architecture.md "Node agents").

`main` is the report/reconcile loop, `ranks` the node's torchrun for one generation, `health`
memory/disk/GPU/kernel-log facts. Torch-free like the rest of `supervisor/`: the agent starts in
well under a second and survives anything the ranks do.
"""
