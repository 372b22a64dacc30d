"""smnn: Scalable Mechanistic Neural Networks.

The solver (``smnn.ode_forward``) and the pieces of the paper's experiments (data, models,
training, tracking). See README.md.
"""

__version__ = "0.1.0"
