"""The trainer behind `python -m lss_megatron.train`: the loop, its stepper (plain or ZeRO), data
and forward/backward, optimizer, checkpoints, fault injection, replica checks and metrics."""
