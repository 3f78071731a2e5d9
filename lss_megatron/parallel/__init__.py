"""The parallel substrate: counted collectives (comm), the rank grid (grid), and how each
parameter is laid out over it (params)."""
