"""topology: the Topology schema, local discovery, the active probe (pyzmq agent and
coordinator) and the emulated lab (network namespaces shaped with tc)."""
