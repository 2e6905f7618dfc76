"""pagedserve worker: owns a device, executes step plans, never decides policy."""
