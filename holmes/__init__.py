"""holmes: the planner and the Plan schema (NIC-fabric clustering, stage placement,
layer partition, NIC selection, sync choice, estimates). Built by a later issue."""
