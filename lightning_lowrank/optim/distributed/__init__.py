"""What differs when weights are sharded (FSDP2) or replicated (DDP): the step on local rows, and the
collectives a refresh shares its result with.
"""
