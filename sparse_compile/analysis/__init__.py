"""Looking at a sparse model without changing it: inspect, FLOP counts, the paper's variance theory."""
