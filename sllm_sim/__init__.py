"""A discrete-event cluster simulator that runs the gateway's own scheduler (`sllm sim`)."""
