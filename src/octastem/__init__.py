"""octastem: the octahedral network of halide perovskites from low-dose 4D-STEM and MLP molecular dynamics."""

__version__ = "0.1.0"
