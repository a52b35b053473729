"""Model zoo (registry), the paper's recipes and data loading."""
